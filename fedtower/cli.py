"""The `fedtower` command line."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated

import typer

from fedtower import __version__
from fedtower.cli_audit import audit
from fedtower.cli_keys import keys_app
from fedtower.cli_recommend import recommend as _recommend_command
from fedtower.cli_serve import serve
from fedtower.cli_site import site_app
from fedtower.cli_state import state_app

app = typer.Typer(
    help=(
        "fedtower: federated, differentially private two-tower recommendation on Flower.\n\n"
        "Every command runs on embedded synthetic data unless given --data PATH "
        "(a MovieLens folder, or a folder with catalogue.csv and events.csv)."
    ),
    no_args_is_help=True,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect, validate and generate datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
config_app = typer.Typer(help="Every run-config and node-config key, with its default.", no_args_is_help=True)
app.add_typer(config_app, name="config")
local_app = typer.Typer(help="The SuperLink `flwr run` starts for local simulations (and leaves running).",
                        no_args_is_help=True)
app.add_typer(local_app, name="local-superlink")
app.command("recommend")(_recommend_command)  # serving from a client's state (fedtower/cli_recommend.py)
app.add_typer(state_app, name="state")  # keygen, encrypt, rotate-key, verify (fedtower/cli_state.py)
app.command("serve")(serve)  # the local HTTP API (fedtower/cli_serve.py)
app.add_typer(keys_app, name="keys")  # TLS certificates and node key pairs (fedtower/cli_keys.py)
app.add_typer(site_app, name="site")  # a partner site's readiness check and ledger (fedtower/cli_site.py)
app.command("audit")(audit)  # verify a privacy ledger, recompute every epsilon (fedtower/cli_audit.py)

DataOption = Annotated[
    str,
    typer.Option(
        "--data",
        help="Dataset folder, or 'synthetic[:users=N,items=M,seed=S]' (the default).",
    ),
]


def _fail(message: str) -> typer.Exit:
    typer.secho(f"Error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def _load(spec: str, on_error: str = "raise"):
    from fedtower.data.sources import resolve_dataset
    from fedtower.data.validation import DataValidationError

    try:
        return resolve_dataset(spec, on_error=on_error)
    except (DataValidationError, FileNotFoundError, ValueError) as err:
        raise _fail(str(err)) from None


def comparison_table(columns: dict[str, dict], keys: list[str]) -> str:
    """Metrics side by side: one row per metric, one column per model."""
    names = list(columns)
    width = max(len(k) for k in keys) + 2
    col = max(12, *(len(n) + 2 for n in names))
    lines = [" " * width + "".join(f"{n:>{col}}" for n in names), "-" * (width + col * len(names))]
    for key in keys:
        cells = []
        for name in names:
            value = columns[name].get(key, float("nan"))
            text = (
                "n/a"
                if isinstance(value, float) and math.isnan(value)
                else (f"{value:.4f}" if isinstance(value, float) else str(value))
            )
            cells.append(f"{text:>{col}}")
        lines.append(f"{key:<{width}}" + "".join(cells))
    return "\n".join(lines)


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


@app.command()
def version() -> None:
    """Print the fedtower version."""
    typer.echo(__version__)


@app.command("train-central")
def train_central(
    data: DataOption = "synthetic",
    epochs: Annotated[int, typer.Option(help="Passes over all users.")] = 40,
    dim: Annotated[int, typer.Option(help="Embedding size.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Users per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (one-cycle schedule).")] = 6e-3,
    loss: Annotated[str, typer.Option(help="softmax | sampled-softmax | bpr")] = "softmax",
    pooling: Annotated[str, typer.Option(help="History pooling: mean | attention")] = "mean",
    history_len: Annotated[int, typer.Option(help="Most recent items pooled per user.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    k: Annotated[int, typer.Option("-k", help="Cut-off of the ranking metrics.")] = 20,
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default runs/central-<time>).")
    ] = None,
) -> None:
    """Train the two-tower model centrally, without privacy: the quality reference.

    Splits each user's interactions by time (latest 20% held out), trains,
    ranks the whole catalogue for every user and prints the metrics next to
    the popularity baseline. Writes results.json, model.pt and the item index
    to the run directory.
    """
    from fedtower.central import run_central
    from fedtower.models.training import TrainConfig

    dataset, report = _load(data)
    typer.echo(report.summary(max_issues=5))
    try:
        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, loss=loss,
                             history_len=history_len, seed=seed)  # fmt: skip
    except ValueError as err:
        raise _fail(str(err)) from None
    out = out or Path("runs") / time.strftime("central-%Y%m%d-%H%M%S")
    typer.echo(f"Training on {dataset.name}: {len(dataset.catalogue):,} items, "
               f"{dataset.events['user'].nunique():,} users, {len(dataset.events):,} events.")  # fmt: skip

    def progress(log: dict) -> None:
        typer.echo(f"epoch {log['epoch']:>3}/{epochs}  loss {log['loss']:.4f}  "
                   f"{log['seconds']:.2f}s")  # fmt: skip

    try:
        result = run_central(dataset, model_settings={"dim": dim, "pooling": pooling},
                             train_config=config, k=k, out_dir=out, progress=progress)  # fmt: skip
    except ValueError as err:
        raise _fail(str(err)) from None
    keys = [f"recall@{k}", f"precision@{k}", f"ndcg@{k}", "mrr", "auc", f"coverage@{k}",
            f"novelty@{k}", f"diversity@{k}", "users"]  # fmt: skip
    typer.echo("")
    typer.echo(comparison_table({"two-tower": result["metrics"], "popularity": result["popularity"]},
                                keys))  # fmt: skip
    typer.echo(f"\n{result['seconds']:.1f}s. Results in {out / 'results.json'}")


@app.command()
def simulate(
    preset: Annotated[
        str, typer.Option(help="Preset name (see --list-presets) or path to a run-config TOML file.")
    ] = "synthetic-sites",
    run_config: Annotated[
        str, typer.Option("--run-config", help="Overrides: \"num-server-rounds=5 strategy='fedadam'\".")
    ] = "",
    site_config: Annotated[
        str, typer.Option("--site-config", help="Node config of every simulated site, e.g. "
                          "\"dp-population-users=2000 allow-raw-evaluation=true\" (a SuperNode's --node-config).")
    ] = "",
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<preset>-<time>).")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its last checkpoint, with its saved config.")
    ] = False,
    list_presets: Annotated[bool, typer.Option("--list-presets", help="List presets and exit.")] = False,
    show: Annotated[bool, typer.Option("--show", help="Print the preset's settings (with --run-config applied) "
                                       "and exit.")] = False,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's debug logs.")] = False,
) -> None:
    """Run a federated simulation on Flower's simulation engine (Ray), on this machine.

    Clients are simulated Flower SuperNodes; each trains on its partition with
    private state in the run directory. Prints progress per round and a
    summary table; writes config.json, metrics.csv/json, plots, checkpoints
    and summary.txt to the run directory.
    """
    from fedtower.client.node_settings import NodeSettings
    from fedtower.config import RunSettings
    from fedtower.simulations import presets as preset_files
    from fedtower.simulations.runner import simulate as run_simulation

    if list_presets:
        names = preset_files.list_presets()
        width = max(map(len, names))
        for name in names:
            typer.echo(f"{name:<{width}}  {preset_files.describe_preset(name)}")
        typer.echo("\nShow one with `fedtower simulate --preset NAME --show`; the files are in "
                   f"{preset_files.PRESETS_DIR}.")  # fmt: skip
        return
    try:
        saved = out / "config.json" if (resume and out is not None) else None
        if saved is not None and saved.exists():
            # Resume the run as it was configured; --run-config may still extend it.
            base = json.loads(saved.read_text())
            base = {k: v for k, v in base.items() if k not in ("output-dir", "run-name")}
        else:
            base = preset_files.load_preset(preset)
        values = {**base, **preset_files.parse_overrides(run_config)}
        if out is None and not resume:
            out = Path("runs") / f"{Path(preset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        if out is not None:
            values.update({"output-dir": str(out.expanduser().resolve().parent), "run-name": out.name})
        values["resume"] = resume or bool(values.get("resume", False))
        settings = RunSettings.from_run_config(values)
        if show:
            typer.echo("\n".join(f"{key} = {json.dumps(value)}" for key, value in sorted(values.items())
                                 if key not in ("output-dir", "run-name", "resume")))  # fmt: skip
            return
        sites = preset_files.parse_overrides(site_config)
        NodeSettings.from_node_config(sites)
    except ValueError as err:
        raise _fail(str(err)) from None
    from fedtower.logs import flower_detail_to_file

    _log_progress(verbose)
    typer.echo(f"Simulating preset {preset!r} into {settings.run_dir}"
               + ("" if verbose else " (Flower's log: flower.log there; --verbose shows it here)"))  # fmt: skip
    try:
        with flower_detail_to_file(Path(settings.run_dir) / "flower.log",
                                   verbose=verbose or settings.flower_detail == "console"):
            result = run_simulation(settings, verbose=verbose, site_config=sites)
    except (ValueError, RuntimeError) as err:
        raise _fail(str(err)) from None
    typer.echo(f"Run directory: {result['run_dir']} (summary.txt, metrics.csv, plots/, checkpoints/, flower.log)")


def _log_progress(verbose: bool) -> None:
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("fedtower")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


@local_app.command("status")
def local_superlink_status() -> None:
    """Show whether `flwr run`'s local SuperLink (for this FLWR_HOME) is running, and its pid."""
    from fedtower.local_superlink import local_log_file, local_superlinks

    pids = local_superlinks()
    if not pids:
        typer.echo(f"No local SuperLink is running for {local_log_file().parents[1]}.")
        return
    typer.echo(f"Local SuperLink running: pid {', '.join(map(str, pids))} (log {local_log_file()}).")


@local_app.command("stop")
def local_superlink_stop() -> None:
    """Stop only `flwr run`'s local SuperLink for this FLWR_HOME and what it started; any other SuperLink
    on the machine (a deployment's) is left alone."""
    from fedtower.local_superlink import local_log_file, stop_local_superlinks

    stopped = stop_local_superlinks()
    if not stopped:
        typer.echo(f"No local SuperLink is running for {local_log_file().parents[1]}.")
        return
    typer.echo(f"Stopped the local SuperLink and {len(stopped) - 1} process(es) it started: pids "
               f"{', '.join(map(str, stopped))}.")  # fmt: skip


@config_app.command("keys")
def config_keys() -> None:
    """List every run-config and node-config key: key = default  (meaning)."""
    from fedtower.client.node_settings import NodeSettings
    from fedtower.config import RunSettings
    from fedtower.config_reference import _rows

    for title, cls in (("run config", RunSettings), ("node config (each SuperNode's own)", NodeSettings)):
        typer.echo(f"# {title}")
        for _, key, _, default, text in _rows(cls):
            typer.echo(f"{key} = {default}" + (f"  ({text})" if text else ""))


@config_app.command("reference")
def config_reference() -> None:
    """Print docs/configuration.md (generated from the settings classes)."""
    from fedtower.config_reference import reference_markdown

    typer.echo(reference_markdown(), nl=False)


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
) -> None:
    """Validate a dataset, or a site's event file against the run's catalogue: every bad row is
    reported with its file, line and field.

    Exits with code 1 when any row was skipped.
    """
    on_error = "raise" if fail_fast else "skip"
    if Path(path).expanduser().is_file():
        dataset, report = _load_event_file(Path(path).expanduser(), catalogue, on_error)
    else:
        dataset, report = _load(path, on_error=on_error)
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(report.summary(max_issues=20))
        typer.echo(f"Catalogue: {len(dataset.catalogue):,} items, "
                   f"{dataset.catalogue.num_features} content features "
                   f"(index fingerprint {dataset.catalogue.index.fingerprint}).")  # fmt: skip
    if report.rows_skipped:
        raise typer.Exit(code=1)


def _load_event_file(path: Path, catalogue: str | None, on_error: str):
    """A site's event file, validated against a catalogue (as its SuperNode loads it each round)."""
    from fedtower.data.loaders import _prefixed_columns, load_catalogue, load_event_log
    from fedtower.data.schema import Dataset
    from fedtower.data.validation import DataValidationError

    beside = [path.parent / name for name in ("catalogue.csv", "catalogue.parquet") if (path.parent / name).exists()]
    try:
        if catalogue is not None:
            items = _load(catalogue)[0].catalogue
        elif beside:
            items = load_catalogue(beside[0], feature_columns=_prefixed_columns(beside[0], "f_"))
        else:
            raise _fail(f"{path} is an event file, and no catalogue.csv is beside it: give the catalogue its items "
                        "belong to with --catalogue (the run's data folder, or 'synthetic').")
        events, report = load_event_log(path, catalogue=items, on_error=on_error)
    except (DataValidationError, FileNotFoundError, ValueError) as err:
        raise _fail(str(err)) from None
    return Dataset(catalogue=items, events=events, name=path.name), report


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
        raise _fail(str(err)) from None
    to_folder(dataset, out)
    typer.echo(
        f"Wrote {len(dataset.events):,} events and {len(dataset.catalogue):,} items to {out}."
    )


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
