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
    split: Annotated[str, typer.Option(help="temporal (latest --test-fraction held out) | leave-one-out (NCF) | "
                                       "none is refused: central training needs a test set.")] = "temporal",
    test_fraction: Annotated[float, typer.Option(help="temporal: share of each user's events held out.")] = 0.2,
    negatives: Annotated[int, typer.Option(help="leave-one-out: sampled negatives per user (0: none).")] = 99,
    sampled_k: Annotated[int, typer.Option(help="Cut-off of HR@k / NDCG@k against sampled negatives.")] = 10,
    negative_pool: Annotated[str, typer.Option(help="leave-one-out: interacted (NCF: items in the interaction "
                                               "data) | catalogue.")] = "interacted",
    train_file: Annotated[Path | None, typer.Option("--train", help="A given split's train events (CSV/Parquet); "
                                                    "--data then only names the catalogue.")] = None,
    test_file: Annotated[Path | None, typer.Option("--test", help="A given split's test rows: user, item"
                                                   "[, negatives].")] = None,
    order: Annotated[str, typer.Option(help="timestamp | file: order events by their place in the file.")]
    = "timestamp",
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default runs/central-<time>).")
    ] = None,
) -> None:
    """Train the two-tower model centrally, without privacy: the quality reference.

    Splits each user's interactions (by default by time, latest 20% held out;
    or leave-one-out; or a split given as --train and --test files), trains
    once, ranks the whole catalogue for every user and prints the metrics next
    to the popularity baseline, and HR@10 / NDCG@10 against sampled negatives
    where the split has them. Writes results.json, model.pt and the item index
    to the run directory.
    """
    from fedtower.central import run_central
    from fedtower.data.protocols import SplitSpec
    from fedtower.models.training import TrainConfig

    if (train_file is None) != (test_file is None):
        raise fail("--train and --test name a given split together; give both or neither.")
    try:
        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, loss=loss,
                             history_len=history_len, seed=seed)  # fmt: skip
        spec = SplitSpec(split, test_fraction=test_fraction, num_negatives=negatives, negative_pool=negative_pool,
                         seed=seed)  # fmt: skip
        if train_file is not None:
            from fedtower.data.given import load_given_split

            catalogue = load(data)[0].catalogue if data != "synthetic" else None
            given = load_given_split(train_file, test_file, catalogue=catalogue, order=order)
            dataset, report, spec = given.dataset, given.report, given.prepare()
            for note in given.notes:
                typer.echo(note)
        else:
            dataset, report = load(data, order=order)
    except (ValueError, OSError) as err:
        raise fail(str(err)) from None
    typer.echo(report.summary(max_issues=5))
    out = out or Path("runs") / time.strftime("central-%Y%m%d-%H%M%S")
    typer.echo(f"Training on {dataset.name}: {len(dataset.catalogue):,} items, "
               f"{dataset.events['user'].nunique():,} users, {len(dataset.events):,} events.")  # fmt: skip

    def progress(log: dict) -> None:
        typer.echo(f"epoch {log['epoch']:>3}/{epochs}  loss {log['loss']:.4f}  "
                   f"{log['seconds']:.2f}s")  # fmt: skip

    try:
        result = run_central(dataset, model_settings={"dim": dim, "pooling": pooling}, split=spec, sampled_k=sampled_k,
                             train_config=config, k=k, out_dir=out, progress=progress)  # fmt: skip
    except ValueError as err:
        raise fail(str(err)) from None
    keys = [f"recall@{k}", f"precision@{k}", f"ndcg@{k}", "mrr", "auc", f"coverage@{k}",
            f"novelty@{k}", f"diversity@{k}", "users"]  # fmt: skip
    typer.echo(f"\nProtocol: {result['protocol']}")
    typer.echo(comparison_table({"two-tower": result["metrics"], "popularity": result["popularity"]},
                                keys))  # fmt: skip
    if "sampled" in result:
        sampled = result["sampled"]
        typer.echo(f"\nAgainst sampled negatives ({sampled['sampled-rows']:,} held-out items; negatives: "
                   f"{sampled['negatives_from']}):")  # fmt: skip
        sampled_keys = [key for key in sampled if key.startswith(("sampled-hr@", "sampled-ndcg@"))]
        typer.echo(comparison_table({"two-tower": sampled, "popularity": result["popularity_sampled"]},
                                    sampled_keys))  # fmt: skip
    typer.echo(f"\n{result['seconds']:.1f}s. Results in {out / 'results.json'}")
