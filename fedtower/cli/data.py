"""`fedtower data`: validate and generate datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedtower.cli.common import fail, load

data_app = typer.Typer(help="Inspect, validate and generate datasets.", no_args_is_help=True)


@data_app.command("check")
def data_check(
    path: Annotated[str, typer.Argument(help="Dataset folder, or a site's event file (CSV/Parquet).")],
    catalogue: Annotated[str | None, typer.Option(
        help="For an event file: the dataset whose catalogue its items must be in (the run's `data`: a folder "
             "or 'synthetic'); default: the catalogue beside the file.")] = None,
    fail_fast: Annotated[
        bool, typer.Option(help="Stop at the first bad row instead of skipping and reporting.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    order: Annotated[str, typer.Option(help="timestamp | file: events without timestamps are ordered by their "
                                       "place in the file.")] = "timestamp",
) -> None:
    """Validate a dataset, or a site's event file against the run's catalogue: every bad row is
    reported with its file, line and field.

    Exits with code 1 when any row was skipped.
    """
    on_error = "raise" if fail_fast else "skip"
    if Path(path).expanduser().is_file():
        dataset, report = _load_event_file(Path(path).expanduser(), catalogue, on_error, order)
    else:
        dataset, report = load(path, on_error=on_error, order=order)
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(report.summary(max_issues=20))
        typer.echo(f"Catalogue: {len(dataset.catalogue):,} items, "
                   f"{dataset.catalogue.num_features} content features "
                   f"(index fingerprint {dataset.catalogue.index.fingerprint}).")  # fmt: skip
    if report.rows_skipped:
        raise typer.Exit(code=1)


def _load_event_file(path: Path, catalogue: str | None, on_error: str, order: str = "timestamp"):
    """A site's event file, validated against a catalogue (as its SuperNode loads it each round)."""
    from fedtower.data.loaders import _prefixed_columns, load_catalogue, load_event_log
    from fedtower.data.schema import Dataset
    from fedtower.data.validation import DataValidationError

    beside = [path.parent / name for name in ("catalogue.csv", "catalogue.parquet") if (path.parent / name).exists()]
    try:
        if catalogue is not None:
            items = load(catalogue)[0].catalogue
        elif beside:
            items = load_catalogue(beside[0], feature_columns=_prefixed_columns(beside[0], "f_"))
        else:
            raise fail(f"{path} is an event file, and no catalogue.csv is beside it: give the catalogue its items "
                        "belong to with --catalogue (the run's data folder, or 'synthetic').")
        events, report = load_event_log(path, catalogue=items, on_error=on_error, order=order)
    except (DataValidationError, FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    return Dataset(catalogue=items, events=events, name=path.name), report


@data_app.command("ncf")
def data_ncf(
    train_rating: Annotated[Path, typer.Argument(help="The NCF split's <name>.train.rating file.")],
    test_negative: Annotated[Path, typer.Argument(help="Its <name>.test.negative file (99 negatives a user).")],
    out: Annotated[Path, typer.Option(help="Folder to write train.csv and test.csv to.")] = Path("ncf-split"),
) -> None:
    """Turn the NCF paper's published split files into train.csv + test.csv for --train / --test.

    Exits with code 1 when a line did not parse (each is listed with its file and line).
    """
    from fedtower.data.ncf_files import convert_ncf

    try:
        report = convert_ncf(train_rating, test_negative, out)
    except (OSError, UnicodeDecodeError) as err:
        raise fail(str(err)) from None
    typer.echo(report.summary(max_issues=20))
    typer.echo(f"Wrote {out / 'train.csv'} and {out / 'test.csv'}: fedtower train-central --train "
               f"{out / 'train.csv'} --test {out / 'test.csv'} --data CATALOGUE (or without --data: the ids in "
               "the files).")  # fmt: skip
    if report.rows_skipped:
        raise typer.Exit(code=1)


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(help="Folder to write catalogue.csv and events.csv to.")],
    users: Annotated[int, typer.Option(help="Number of users.")] = 1000,
    items: Annotated[int, typer.Option(help="Number of catalogue items.")] = 2000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data).")] = 0,
) -> None:
    """Generate a synthetic dataset (deterministic by seed) and save it as CSV."""
    from fedtower.data.synthetic import SyntheticConfig, generate, to_folder

    try:
        dataset = generate(SyntheticConfig(num_users=users, num_items=items, seed=seed))
    except ValueError as err:
        raise fail(str(err)) from None
    to_folder(dataset, out)
    typer.echo(
        f"Wrote {len(dataset.events):,} events and {len(dataset.catalogue):,} items to {out}."
    )
