"""Federated (no DP) two-tower quality against the centralised model, measured in one run.

    python benchmarks/quality_federated.py --data ../shared/data/ml-latest-small --sites 10
    python benchmarks/quality_federated.py --data ../shared/data/ml-latest-small --preset movielens-cross-device
    python benchmarks/quality_federated.py --data ../shared/data/ml-latest-small --clients users \\
        --fraction 0.1 --rounds 60 --local-epochs 2 --run-config "strategy='fedadam' server-tau=1e-8"

    python benchmarks/quality_federated.py --train train.csv --test test.csv --order file --sites 10

With --preset the preset's run config is the start (any flag given, then --run-config, override it);
without one, the flags' defaults are. The JSON also holds the NDCG@20 curve over the evaluated rounds.

Trains the centralised model and the federated one (Flower's simulation engine,
partner sites or one user per client) with the same model settings, evaluates
both on the same split (the fixed temporal protocol unless --split or --train/--test
name another; `protocol` in the JSON says which) and prints one JSON object as the
last line: ndcg@20, recall@20, central_ndcg@20, central_recall@20, ratio (federated
NDCG@20 over central), seconds, and sampled HR@10 / NDCG@10 where the split has negatives.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from fedtower.central import run_central
from fedtower.client.local import run_dataset, run_split
from fedtower.config import RunSettings
from fedtower.models.training import TrainConfig
from fedtower.simulations.presets import load_preset, parse_overrides
from fedtower.simulations.runner import simulate
from fedtower.tables import comparison_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="dataset (default: the preset's, else synthetic)")
    parser.add_argument("--preset", default=None, help="a preset name or run-config TOML file to start from")
    parser.add_argument("--clients", choices=("sites", "users"), default=None, help="default sites")
    parser.add_argument("--sites", type=int, default=None, help="default 10")
    parser.add_argument("--rounds", type=int, default=None, help="default 40")
    parser.add_argument("--local-epochs", type=int, default=None, help="default 4")
    parser.add_argument("--lr", type=float, default=None, help="default 0.006")
    parser.add_argument("--fraction", type=float, default=None, help="share of clients per round (default 1.0)")
    parser.add_argument("--eval-every", type=int, default=None, help="default 10")
    parser.add_argument("--dim", type=int, default=None, help="default 128")
    parser.add_argument("--strategy", default=None, help="default fedavg")
    parser.add_argument("--split", choices=("temporal", "leave-one-out"), default=None, help="default temporal")
    parser.add_argument("--train", default=None, help="a given split's train events (with --test)")
    parser.add_argument("--test", default=None, help="a given split's test rows: user, item[, negatives]")
    parser.add_argument("--order", choices=("timestamp", "file"), default=None, help="event order (default timestamp)")
    parser.add_argument("--run-config", default="", help="more run-config overrides, e.g. \"server-tau=1e-8\"")
    parser.add_argument("--central-epochs", type=int, default=40)
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args(argv)
    if (args.train is None) != (args.test is None):
        parser.error("--train and --test name a given split together; give both or neither.")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")

    out = args.out or tempfile.mkdtemp(prefix="fedtower-quality-")
    settings = RunSettings.from_run_config({
        **run_config_of(args), "fraction-evaluate": 1.0, "output-dir": out, "run-name": "federated",
    })  # fmt: skip
    started = time.perf_counter()
    # The central model trains and is scored on the very split the clients hold, cut from the same data.
    split = run_split(settings)
    central = run_central(run_dataset(settings), model_settings={"dim": settings.dim}, split=split,
                          sampled_k=settings.sampled_k,
                          train_config=TrainConfig(epochs=args.central_epochs))  # fmt: skip
    central_seconds = time.perf_counter() - started

    federated_started = time.perf_counter()
    result = simulate(settings)
    federated_seconds = time.perf_counter() - federated_started
    evaluations = [row for row in result["history"] if row["phase"] == "evaluate"]
    final = evaluations[-1]

    keys = ["ndcg@20", "recall@20", "precision@20", "mrr", "coverage@20"]
    print(comparison_table({"federated": final, "central": central["metrics"]}, keys), file=sys.stderr)
    out_json = {
        "data": settings.data if settings.split != "given" else f"{settings.train_data} + {settings.test_data}",
        "protocol": central["protocol"],
        "preset": args.preset,
        "clients": settings.partitioning,
        "num_clients": settings.num_sites if settings.partitioning == "sites" else central["users"],
        "rounds": settings.num_server_rounds,
        "local_epochs": settings.local_epochs,
        "fraction": settings.fraction_train,
        "strategy": settings.strategy,
        "curve": {int(row["round"]): row["ndcg@20"] for row in evaluations},
        "ndcg@20": final["ndcg@20"],
        "recall@20": final["recall@20"],
        "central_ndcg@20": central["metrics"]["ndcg@20"],
        "central_recall@20": central["metrics"]["recall@20"],
        "ratio": final["ndcg@20"] / central["metrics"]["ndcg@20"],
        "recall_ratio": final["recall@20"] / central["metrics"]["recall@20"],
        "central_seconds": central_seconds,
        "federated_seconds": federated_seconds,
        "seconds_per_round": federated_seconds / settings.num_server_rounds,
        "run_dir": result["run_dir"],
    }
    if "sampled" in central:
        sampled_keys = [key for key in central["sampled"] if key.startswith(("sampled-hr@", "sampled-ndcg@"))]
        print(comparison_table({"federated": final, "central": central["sampled"]}, sampled_keys), file=sys.stderr)
        out_json |= {key: final.get(key) for key in sampled_keys}
        out_json |= {f"central_{key}": central["sampled"][key] for key in sampled_keys}
        out_json["negatives_from"] = central["sampled"]["negatives_from"]
    out_json["seconds"] = time.perf_counter() - started
    print(json.dumps(out_json))
    return out_json


FLAG_KEYS = {"data": "data", "split": "split", "order": "event-order", "clients": "partitioning",
             "sites": "num-sites", "rounds": "num-server-rounds",
             "local_epochs": "local-epochs", "lr": "lr", "fraction": "fraction-train", "eval_every": "eval-every",
             "dim": "dim", "strategy": "strategy"}  # fmt: skip
DEFAULTS = {"data": "synthetic", "partitioning": "sites", "num-sites": 10, "num-server-rounds": 40,
            "local-epochs": 4, "lr": 6e-3, "fraction-train": 1.0, "eval-every": 10, "dim": 128,
            "strategy": "fedavg"}  # fmt: skip


def run_config_of(args) -> dict:
    """The preset (or the defaults), then every flag given, then --run-config."""
    values = dict(load_preset(args.preset)) if args.preset else dict(DEFAULTS)
    values.update({key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None})
    if args.train is not None:  # absolute: the clients run in Ray workers
        values.update({"split": "given", "train-data": str(Path(args.train).expanduser().resolve()),
                       "test-data": str(Path(args.test).expanduser().resolve())})  # fmt: skip
    values.update(parse_overrides(args.run_config))
    return values


if __name__ == "__main__":
    main()
