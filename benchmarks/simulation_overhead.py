"""Seconds per federated round on Flower's simulation engine vs the same work in a plain loop.

    python benchmarks/simulation_overhead.py --data ../shared/data/ml-latest-small

Runs, in one process and one sitting, the same local training (same data,
partitions, model, TrainConfig, rounds) twice: as a plain Python loop
(fedtower.simulations.plain) and through Flower's simulation engine with the
real ClientApp (state files, messages, Ray). Done at 10 partner sites and at
one user per client with 10% of clients per round. Per-round times exclude
start-up (Ray, data loading) and evaluation, which runs only after the last
round; a third loop runs the same rounds through fedtower's real handlers and
server in this process (no Flower engine), so fedtower's own share of a round
shows beside Flower's. The ratio is over the steady rounds after the first two (Ray's workers
start and meet their partitions then), and the ratio with those rounds is
reported too. Last line: JSON with seconds per round and the overhead ratio
per setup.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time

import torch

from fedtower.config import RunSettings
from fedtower.simulations.in_process import simulate_in_process
from fedtower.simulations.plain import plain_federation
from fedtower.simulations.presets import parse_overrides
from fedtower.simulations.runner import num_partitions, simulate

WARM_UP_ROUNDS = 2


def measure(base: dict, rounds: int) -> dict:
    if rounds < WARM_UP_ROUNDS + 2:
        raise ValueError(f"--rounds must be at least {WARM_UP_ROUNDS + 2}: {WARM_UP_ROUNDS} warm-up rounds, one "
                         "steady round and the evaluating last round.")
    settings = RunSettings.from_run_config({**base, "num-server-rounds": rounds, "eval-every": rounds,
                                            "output-dir": tempfile.mkdtemp(prefix="fedtower-overhead-"),
                                            "run-name": "run"})  # fmt: skip
    partitions = num_partitions(settings)
    plain = plain_federation(settings, num_partitions=partitions)
    # The last round also evaluates; the first WARM_UP_ROUNDS warm up (Ray's workers start and each worker
    # meets its partitions for the first time). Compare the steady training rounds between.
    steady = slice(WARM_UP_ROUNDS, -1)
    plain_seconds = statistics.median(r["seconds"] for r in plain["rounds"][steady])
    # The same rounds with fedtower's real handlers, state files and server logic, but no Flower engine:
    # what is left above the plain loop is fedtower's, what the engine adds above this is Flower's and Ray's.
    in_process = simulate_in_process(RunSettings.from_run_config({**settings.to_run_config(), "output-dir":
                                     tempfile.mkdtemp(prefix="fedtower-overhead-"), "run-name": "in-process"}))[0]
    in_process_rounds = [row["round-seconds"] for row in in_process["history"] if row["phase"] == "train"]
    in_process_seconds = statistics.median(in_process_rounds[steady])
    started = time.perf_counter()
    result = simulate(settings)
    total = time.perf_counter() - started
    flower_rounds = [row["round-seconds"] for row in result["history"] if row["phase"] == "train"]
    flower_seconds = statistics.median(flower_rounds[steady])
    with_warm_up = statistics.median(flower_rounds[:-1]) / statistics.median(r["seconds"] for r in plain["rounds"][:-1])
    return {
        "clients": partitions,
        "clients_per_round": max(1, int(partitions * settings.fraction_train)),
        "rounds": rounds,
        "plain_seconds_per_round": plain_seconds,
        "flower_seconds_per_round": flower_seconds,
        "overhead_ratio": flower_seconds / plain_seconds,
        "overhead_ratio_with_warm_up": with_warm_up,  # median over every training round, warm-up included
        # One client after another in this process (as the plain loop): fedtower's share of a round is
        # in_process - plain; Flower's engine runs clients_in_parallel at a time, so its share is not a difference.
        "in_process_seconds_per_round": in_process_seconds,
        "fedtower_share_seconds_per_round": in_process_seconds - plain_seconds,
        "in_process_round_seconds": in_process_rounds,
        "flower_total_seconds": total,
        "plain_round_seconds": [r["seconds"] for r in plain["rounds"]],
        "flower_round_seconds": flower_rounds,
        "client_num_cpus": settings.client_num_cpus,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--skip-users", action="store_true", help="only the 10-site setup")
    parser.add_argument("--skip-sites", action="store_true", help="only the one-user-client setup")
    parser.add_argument("--run-config", default="", help="run-config overrides for the one-user clients, e.g. the "
                        "cross-device recipe of preset movielens-cross-device (the plain loop averages; a server "
                        "optimizer's step is under 1%% of a round)")  # fmt: skip
    parser.add_argument("--users-fraction", type=float, default=0.1,
                        help="share of one-user clients per round (0.164 = 100 of ml-latest-small's 610)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    common = {"data": args.data, "local-epochs": args.local_epochs, "dim": args.dim}
    out = {"data": args.data, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "load_average_before": os.getloadavg()[0]}  # fmt: skip
    if not args.skip_sites:
        out["sites_10"] = measure({**common, "partitioning": "sites", "num-sites": 10}, args.rounds)
        print(json.dumps(out["sites_10"]), file=sys.stderr)
    if not args.skip_users:
        users = {**common, "partitioning": "users", "fraction-train": args.users_fraction,
                 **parse_overrides(args.run_config)}  # fmt: skip
        out["users"] = measure(users, args.rounds)
        print(json.dumps(out["users"]), file=sys.stderr)
    out["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
