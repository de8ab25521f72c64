"""Centralised two-tower quality under the fixed protocol of BENCHMARKS.md, or a split you name.

    python benchmarks/quality_central.py --data ../shared/data/ml-latest-small               # temporal
    python benchmarks/quality_central.py --data ../shared/data/ml-latest-small --loo         # NCF leave-one-out
    python benchmarks/quality_central.py --train train.csv --test test.csv [--order file]    # a given split

One model is trained per run, on the split the run names, and scored by full ranking (recall@20,
ndcg@20, ... next to the popularity baseline of the same split) and, where the split has sampled
negatives (leave-one-out, or a test file with a `negatives` column), by HR@10 / NDCG@10 against them.
Prints progress, a summary table, and one JSON object as the last line; its `protocol` says which
protocol the figures follow and where the negatives came from.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from fedtower.central import run_central
from fedtower.data.given import load_given_split
from fedtower.data.protocols import EVENT_ORDERS, NEGATIVE_POOLS, SPLITS, SplitSpec
from fedtower.data.sources import resolve_dataset
from fedtower.models.training import TrainConfig
from fedtower.tables import comparison_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="dataset folder or synthetic spec (with --train/--test: "
                        "where the catalogue comes from; default the ids in the two files)")
    parser.add_argument("--split", choices=sorted(SPLITS), default="temporal",
                        help="how each user's interactions are split (default: temporal, BENCHMARKS.md)")
    parser.add_argument("--loo", action="store_true", help="the same as --split leave-one-out (NCF protocol)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="temporal: share held out per user")
    parser.add_argument("--negatives", type=int, default=99, help="leave-one-out: sampled negatives per user")
    parser.add_argument("--sampled-k", type=int, default=10, help="cut-off of HR@k / NDCG@k against the negatives")
    parser.add_argument("--negative-pool", choices=sorted(NEGATIVE_POOLS), default="interacted",
                        help="leave-one-out: where negatives come from (interacted: the NCF protocol)")
    parser.add_argument("--train", help="a given split's train events (CSV/Parquet file or folder)")
    parser.add_argument("--test", help="a given split's test rows: user, item[, negatives]")
    parser.add_argument("--order", choices=EVENT_ORDERS, default="timestamp",
                        help="order events by their timestamp column, or by their place in the file")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.loo:
        args.split = "leave-one-out"
    if (args.train is None) != (args.test is None):
        parser.error("--train and --test name a given split together; give both or neither.")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    config = TrainConfig(epochs=args.epochs, seed=args.seed)
    if args.train is not None:
        catalogue = resolve_dataset(args.data)[0].catalogue if args.data else None
        given = load_given_split(args.train, args.test, catalogue=catalogue, order=args.order)
        print(given.report.summary(max_issues=5), *given.notes, sep="\n", file=sys.stderr)
        dataset, split, data_name = given.dataset, given.prepare(), f"{args.train} + {args.test}"
    else:
        dataset, report = resolve_dataset(args.data, order=args.order)
        if report.rows_skipped:
            print(report.summary(max_issues=5), file=sys.stderr)
        split = SplitSpec(args.split, test_fraction=args.test_fraction, num_negatives=args.negatives,
                          negative_pool=args.negative_pool, seed=args.seed)  # fmt: skip
        data_name = args.data or "synthetic"
    result = run_central(
        dataset, model_settings={"dim": args.dim}, train_config=config, split=split, sampled_k=args.sampled_k,
        progress=lambda log: print(f"epoch {log['epoch']:>3}  loss {log['loss']:.4f}",
                                   file=sys.stderr),
    )  # fmt: skip
    metrics, popularity = result["metrics"], result["popularity"]
    keys = ["recall@20", "precision@20", "ndcg@20", "hr@20", "mrr", "coverage@20", "novelty@20", "diversity@20"]
    print(f"Protocol: {result['protocol']}", file=sys.stderr)
    print(comparison_table({"two-tower": metrics, "popularity": popularity}, keys), file=sys.stderr)
    out = {
        "data": data_name,
        "protocol": result["protocol"],
        "users": result["users"],
        "items": result["items"],
        "train_interactions": result["train_interactions"],
        "test_interactions": result["test_interactions"],
        **{key: metrics[key] for key in keys},
        "popularity_ndcg@20": popularity["ndcg@20"],
        "popularity_recall@20": popularity["recall@20"],
        "train_seconds": sum(log["seconds"] for log in result["epochs"]),
    }
    if "sampled" in result:
        sampled, baseline = result["sampled"], result["popularity_sampled"]
        sampled_keys = [key for key in sampled if key.startswith(("sampled-hr@", "sampled-ndcg@"))]
        print(f"Sampled negatives: {sampled['negatives_from']}", file=sys.stderr)
        print(comparison_table({"two-tower": sampled, "popularity": baseline}, sampled_keys), file=sys.stderr)
        out.update({key: sampled[key] for key in sampled_keys})
        out.update({f"popularity_{key}": baseline[key] for key in sampled_keys})
        out["sampled_rows"], out["negatives_from"] = sampled["sampled-rows"], sampled["negatives_from"]
    out["seconds"] = time.perf_counter() - started
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
