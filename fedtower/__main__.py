"""`python -m fedtower`: the same as the `fedtower` command."""

from fedtower.cli import run

run()
