"""Quality under client DP against its non-private twin, measured in one run.

    python benchmarks/quality_dp.py --data ../shared/data/ml-latest-small --unit user --epsilon 4
    python benchmarks/quality_dp.py --data ../shared/data/ml-latest-small --unit user --epsilon 1 2 4 8

Runs the federation (Flower's simulation engine, partner sites) without DP and
then with DP calibrated to each target epsilon (noise computed once per run
from the planned rounds and local epochs, delta = 1/(10 N) per client for its
public population N: a DP count of its users, charged to its budget), with
the same data, partitions, model and rounds. Prints a table and one JSON
object as the last line: per epsilon, ndcg@20, recall@20, coverage@20, ratio to
the twin, and the epsilon actually spent (max over clients, from their
accountants); and a plot of quality against epsilon spent (--plot).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time

from fedtower.central import popularity_baseline
from fedtower.config import RunSettings
from fedtower.data.prepared import prepare_split
from fedtower.data.protocols import SplitSpec
from fedtower.data.sources import resolve_dataset
from fedtower.server.report import plot_privacy_curve
from fedtower.simulations.runner import simulate

SITES = {"allow-raw-evaluation": True, "allow-plaintext-state": True}


def federated(base: dict, name: str, out: str, **dp) -> dict:
    settings = RunSettings.from_run_config({**base, **dp, "output-dir": out, "run-name": name})
    started = time.perf_counter()
    # Exact evaluation sums from every simulated site: this measures the model, and in a simulation whoever
    # runs it holds every site's data. A deployed DP site releases noisy sums instead (README, privacy).
    result = simulate(settings, site_config=SITES)
    final = [row for row in result["history"] if row["phase"] == "evaluate"][-1]
    spent = [e["epsilon_after"] for e in result["ledger"] if e["status"] == "trained"]
    return {"ndcg@20": final["ndcg@20"], "recall@20": final["recall@20"],
            "coverage@20": final.get("coverage@20", float("nan")),
            "epsilon_spent": max(spent) if spent else 0.0,
            "delta_max": max((e["delta"] for e in result["ledger"]), default=0.0),
            "rounds_completed": max(r["round"] for r in result["history"] if r["phase"] == "train"),
            "seconds": time.perf_counter() - started}  # fmt: skip


def popularity_ndcg(data: str) -> float:
    """Most-popular-first over every user's training items: the same split the federation evaluates on
    (sites partition users; each user's split is by time), a non-private reference."""
    dataset, _ = resolve_dataset(data)
    return popularity_baseline(prepare_split(dataset)).finalize()["ndcg@20"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--unit", choices=("user", "interaction"), default="user")
    parser.add_argument("--epsilon", type=float, nargs="+", default=[4.0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dp-batch-size", type=int, default=16)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--dp-table-lr", type=float, default=0.5, help="SGD step on the embedding tables")
    parser.add_argument("--embedding-path", choices=("sparse", "opacus"), default="sparse")
    parser.add_argument("--mechanism", choices=("spectral", "sgd"), default="spectral",
                        help="spectral: the spectral DP item tower (three releases); sgd: DP-SGD rounds")
    parser.add_argument("--secure", action="store_true", help="federation-wide DP under secure aggregation")
    parser.add_argument("--plot", default=None, help="PNG of quality against epsilon spent "
                        "(default: privacy_curve.png in the run directory)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    out = tempfile.mkdtemp(prefix="fedtower-dp-")
    base = {"data": args.data, "partitioning": "sites", "num-sites": args.sites, "num-server-rounds": args.rounds,
            "local-epochs": args.local_epochs, "lr": args.lr, "dim": args.dim, "eval-every": args.rounds,
            "privacy-unit": args.unit, "dp-batch-size": args.dp_batch_size,
            "max-grad-norm": args.max_grad_norm, "dp-table-lr": args.dp_table_lr,
            "dp-embedding-path": args.embedding_path}  # fmt: skip
    popularity = popularity_ndcg(args.data)
    dp_base = dict(base)
    if args.mechanism == "spectral":
        dp_base.update({"dp-mechanism": "spectral", "num-server-rounds": 3, "eval-every": 3})
    if args.secure:
        users = int(resolve_dataset(args.data)[0].events["user"].nunique())
        dp_base.update({"secure-aggregation": True, "dp-federation-users": users})
    print(f"popularity (central reference): ndcg@20 {popularity:.4f}", file=sys.stderr)
    twin = federated(base, "non-private", out)
    print(f"non-private twin: ndcg@20 {twin['ndcg@20']:.4f}  ({twin['seconds']:.0f}s)", file=sys.stderr)
    curve = []
    for epsilon in args.epsilon:
        point = federated(dp_base, f"eps-{epsilon:g}", out, **{"target-epsilon": epsilon})
        point["delta"] = point["delta_max"]
        point.update({"target_epsilon": epsilon, "ratio": point["ndcg@20"] / twin["ndcg@20"]})
        curve.append(point)
        print(f"epsilon {epsilon:g}: ndcg@20 {point['ndcg@20']:.4f} ratio {point['ratio']:.3f} "
              f"spent {point['epsilon_spent']:.3f} ({point['seconds']:.0f}s)", file=sys.stderr)  # fmt: skip
    result = {"data": args.data, "unit": args.unit, "sites": args.sites, "rounds": args.rounds,
              "local_epochs": args.local_epochs, "dim": args.dim, "dp_batch_size": args.dp_batch_size,
              "dp_table_lr": args.dp_table_lr, "embedding_path": args.embedding_path,
              "mechanism": args.mechanism, "secure": args.secure,
              "popularity_ndcg@20": popularity, "non_private": twin, "curve": curve}  # fmt: skip
    plot = plot_privacy_curve(curve, args.plot or f"{out}/privacy_curve.png", references={
        "popularity, same split": {"ndcg@20": popularity},
        "non-private federation": {k: twin[k] for k in ("ndcg@20", "recall@20")}})  # fmt: skip
    print(f"plot: {plot}", file=sys.stderr)
    result["plot"] = str(plot)
    if len(curve) == 1:
        result.update({k: curve[0][k] for k in ("ndcg@20", "recall@20", "ratio", "epsilon_spent")})
    result["protocol"] = SplitSpec().describe()  # every figure here is on the temporal split
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
