"""`fedtower simulate`: a federation on Flower's simulation engine, on this machine."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from fedtower.cli.common import fail


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
    train_file: Annotated[Path | None, typer.Option("--train", help="A given split's train events (CSV/Parquet); "
                                                    "with --test, the run's split is that pair of files.")] = None,
    test_file: Annotated[Path | None, typer.Option("--test", help="A given split's test rows: user, item"
                                                   "[, negatives].")] = None,
    order: Annotated[str | None, typer.Option(help="timestamp | file: order events by their place in the files "
                                              "(run config event-order).")] = None,
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
        if (train_file is None) != (test_file is None):
            raise ValueError("--train and --test name a given split together; give both or neither.")
        values = dict(base)
        if train_file is not None:  # absolute: the clients run in Ray workers
            values.update({"split": "given", "train-data": str(train_file.expanduser().resolve()),
                           "test-data": str(test_file.expanduser().resolve())})  # fmt: skip
        if order is not None:
            values["event-order"] = order
        values.update(preset_files.parse_overrides(run_config))
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
        raise fail(str(err)) from None
    from fedtower.logs import flower_detail_to_file

    _log_progress(verbose)
    typer.echo(f"Simulating preset {preset!r} into {settings.run_dir}"
               + ("" if verbose else " (Flower's log: flower.log there; --verbose shows it here)"))  # fmt: skip
    try:
        with flower_detail_to_file(Path(settings.run_dir) / "flower.log",
                                   verbose=verbose or settings.flower_detail == "console"):
            result = run_simulation(settings, verbose=verbose, site_config=sites)
    except (ValueError, RuntimeError) as err:
        raise fail(str(err)) from None
    typer.echo(f"Run directory: {result['run_dir']} (summary.txt, metrics.csv, plots/, checkpoints/, flower.log)")


def _log_progress(verbose: bool) -> None:
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("fedtower")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
