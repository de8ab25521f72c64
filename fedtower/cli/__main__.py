"""`python -m fedtower.cli`: the `fedtower` command."""

from fedtower.cli import run

run()
