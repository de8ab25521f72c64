"""`fedtower train-central` and `fedtower version`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from fedtower import __version__
from fedtower.cli.common import DataOption, fail, load
from fedtower.tables import comparison_table


def version() -> None:
    """Print the fedtower version."""
    typer.echo(__version__)


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

    dataset, report = load(data)
    typer.echo(report.summary(max_issues=5))
    try:
        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, loss=loss,
                             history_len=history_len, seed=seed)  # fmt: skip
    except ValueError as err:
        raise fail(str(err)) from None
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
        raise fail(str(err)) from None
    keys = [f"recall@{k}", f"precision@{k}", f"ndcg@{k}", "mrr", "auc", f"coverage@{k}",
            f"novelty@{k}", f"diversity@{k}", "users"]  # fmt: skip
    typer.echo("")
    typer.echo(comparison_table({"two-tower": result["metrics"], "popularity": result["popularity"]},
                                keys))  # fmt: skip
    typer.echo(f"\n{result['seconds']:.1f}s. Results in {out / 'results.json'}")
