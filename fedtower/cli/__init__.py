"""The `fedtower` command line: one module per command group, assembled here.

`main` turns a user's mistake into one line and exit code 2 (tracebacks with --verbose)."""

from __future__ import annotations

from typing import Annotated

import typer

from fedtower import __version__
from fedtower.cli.audit import audit
from fedtower.cli.config import config_app
from fedtower.cli.data import data_app
from fedtower.cli.keys import keys_app
from fedtower.cli.local_superlink import local_app
from fedtower.cli.recommend import recommend
from fedtower.cli.serve import serve
from fedtower.cli.simulate import simulate
from fedtower.cli.site import site_app
from fedtower.cli.state import state_app
from fedtower.cli.train import train_central, version

app = typer.Typer(
    help=(
        "fedtower: federated, differentially private two-tower recommendation on Flower.\n\n"
        "Every command runs on embedded synthetic data unless given --data PATH "
        "(a MovieLens folder, or a folder with catalogue.csv and events.csv)."
    ),
    no_args_is_help=True,
    add_completion=False,
)
app.command()(version)
app.command("train-central")(train_central)
app.command()(simulate)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
app.add_typer(local_app, name="local-superlink")
app.command("recommend")(recommend)  # serving from a client's state
app.add_typer(state_app, name="state")  # keygen, encrypt, rotate-key, verify
app.command("serve")(serve)  # the local HTTP API
app.add_typer(keys_app, name="keys")  # TLS certificates and node key pairs
app.add_typer(site_app, name="site")  # a partner site's readiness check and ledger
app.command("audit")(audit)  # verify a privacy ledger, recompute every epsilon


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print the fedtower version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Tracebacks instead of one-line errors.")] = False,
) -> None:
    """fedtower: federated, differentially private two-tower recommendation on Flower."""


# What a user's mistake raises (a missing file, a bad value, a refused state): one line, exit code 2.
USER_ERRORS = (ValueError, OSError, RuntimeError)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
    """The `fedtower` command: a user's mistake is one line on stderr and exit code 2; `--verbose` (or
    FEDTOWER_TRACEBACK=1) shows the traceback instead."""
    import os
    import sys

    import click

    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args or os.environ.get("FEDTOWER_TRACEBACK") == "1"
    try:
        code = app(args=args, prog_name="fedtower", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as err:  # usage errors: click's own message, exit code 2
        err.show()
        return err.exit_code
    except click.exceptions.Abort:
        typer.echo("Aborted.", err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure ends as one line unless --verbose
        if verbose:
            raise
        if isinstance(err, USER_ERRORS):
            typer.secho(f"Error: {_one_line(err)}", fg=typer.colors.RED, err=True)
            typer.echo("(--verbose shows the traceback)", err=True)
            return 2
        typer.secho(f"Internal error ({type(err).__name__}): {_one_line(err)}", fg=typer.colors.RED, err=True)
        typer.echo("Run again with --verbose and report the traceback.", err=True)
        return 1
    return code if isinstance(code, int) else 0


def run() -> None:
    """Console-script entry point."""
    import sys

    sys.exit(main())


if __name__ == "__main__":
    run()
