"""What the command groups share: the one-line error, loading a dataset, a side-by-side table."""

from __future__ import annotations

from typing import Annotated

import typer

DataOption = Annotated[
    str,
    typer.Option(
        "--data",
        help="Dataset folder, or 'synthetic[:users=N,items=M,seed=S]' (the default).",
    ),
]


def fail(message: str) -> typer.Exit:
    typer.secho(f"Error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def load(spec: str, on_error: str = "raise", order: str = "timestamp"):
    from fedtower.data.sources import resolve_dataset
    from fedtower.data.validation import DataValidationError

    try:
        return resolve_dataset(spec, on_error=on_error, order=order)
    except (DataValidationError, FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
