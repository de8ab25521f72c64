"""Federated (no DP) two-tower quality against the centralised model, measured in one run.

    python benchmarks/quality_federated.py --data ../shared/data/ml-latest-small --sites 10
    python benchmarks/quality_federated.py --data ../shared/data/ml-latest-small --clients users \\
        --fraction 0.1 --rounds 60 --local-epochs 2

Trains the centralised model and the federated one (Flower's simulation engine,
partner sites or one user per client) with the same model settings, evaluates
both under the fixed temporal protocol and prints one JSON object as the last
line: ndcg@20, recall@20, central_ndcg@20, central_recall@20, ratio (federated
NDCG@20 over central), seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time

from fedtower.central import run_central
from fedtower.config import RunSettings
from fedtower.data.sources import resolve_dataset
from fedtower.models.training import TrainConfig
from fedtower.simulations.runner import simulate
from fedtower.tables import comparison_table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--clients", choices=("sites", "users"), default="sites")
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--local-epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--fraction", type=float, default=1.0, help="share of clients per round")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--central-epochs", type=int, default=40)
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")

    started = time.perf_counter()
    dataset, _ = resolve_dataset(args.data)
    central = run_central(dataset, model_settings={"dim": args.dim},
                          train_config=TrainConfig(epochs=args.central_epochs))  # fmt: skip
    central_seconds = time.perf_counter() - started

    out = args.out or tempfile.mkdtemp(prefix="fedtower-quality-")
    settings = RunSettings.from_run_config({
        "data": args.data, "partitioning": args.clients, "num-sites": args.sites,
        "num-server-rounds": args.rounds, "local-epochs": args.local_epochs, "lr": args.lr,
        "fraction-train": args.fraction, "fraction-evaluate": 1.0, "eval-every": args.eval_every,
        "dim": args.dim, "strategy": args.strategy, "output-dir": out, "run-name": "federated",
    })  # fmt: skip
    federated_started = time.perf_counter()
    result = simulate(settings)
    federated_seconds = time.perf_counter() - federated_started
    final = [row for row in result["history"] if row["phase"] == "evaluate"][-1]

    keys = ["ndcg@20", "recall@20", "precision@20", "mrr", "coverage@20"]
    print(comparison_table({"federated": final, "central": central["metrics"]}, keys), file=sys.stderr)
    out_json = {
        "data": args.data,
        "clients": args.clients,
        "num_clients": args.sites if args.clients == "sites" else central["users"],
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "fraction": args.fraction,
        "ndcg@20": final["ndcg@20"],
        "recall@20": final["recall@20"],
        "central_ndcg@20": central["metrics"]["ndcg@20"],
        "central_recall@20": central["metrics"]["recall@20"],
        "ratio": final["ndcg@20"] / central["metrics"]["ndcg@20"],
        "recall_ratio": final["recall@20"] / central["metrics"]["recall@20"],
        "central_seconds": central_seconds,
        "federated_seconds": federated_seconds,
        "seconds_per_round": federated_seconds / args.rounds,
        "run_dir": result["run_dir"],
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(out_json))
    return out_json


if __name__ == "__main__":
    main()
