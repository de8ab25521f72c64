"""Centralised two-tower quality under the fixed protocol of BENCHMARKS.md.

    python benchmarks/quality_central.py --data ../shared/data/ml-latest-small [--loo]

Prints progress, a summary table, and one JSON object as the last line with
recall@20, ndcg@20, coverage@20, novelty@20, seconds (and the popularity
baseline measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from fedtower.central import run_central, run_leave_one_out
from fedtower.data.sources import resolve_dataset
from fedtower.models.training import TrainConfig
from fedtower.tables import comparison_table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="dataset folder or synthetic spec")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--loo",
        action="store_true",
        help="also train and report HR@10/NDCG@10 under leave-one-out (NCF)",
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    dataset, _ = resolve_dataset(args.data)
    config = TrainConfig(epochs=args.epochs, seed=args.seed)
    result = run_central(
        dataset, model_settings={"dim": args.dim}, train_config=config,
        progress=lambda log: print(f"epoch {log['epoch']:>3}  loss {log['loss']:.4f}",
                                   file=sys.stderr),
    )  # fmt: skip
    metrics, popularity = result["metrics"], result["popularity"]
    keys = ["recall@20", "precision@20", "ndcg@20", "mrr", "coverage@20", "novelty@20",
            "diversity@20"]  # fmt: skip
    print(comparison_table({"two-tower": metrics, "popularity": popularity}, keys), file=sys.stderr)
    out = {
        "data": args.data,
        "users": result["users"],
        "items": result["items"],
        "train_interactions": result["train_interactions"],
        "test_interactions": result["test_interactions"],
        **{key: metrics[key] for key in keys},
        "popularity_ndcg@20": popularity["ndcg@20"],
        "popularity_recall@20": popularity["recall@20"],
        "train_seconds": sum(log["seconds"] for log in result["epochs"]),
    }
    if args.loo:
        out.update({f"loo_{k}": v for k, v in run_leave_one_out(
            dataset, model_settings={"dim": args.dim}, train_config=config).items()})  # fmt: skip
    out["seconds"] = time.perf_counter() - started
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
