"""How long the synthetic generator takes at scale, and its peak memory.

Usage: python benchmarks/synthetic_scale.py --users 100000 --items 20000

Also times the downstream steps every run takes (events -> weighted
interactions -> temporal split). Prints one JSON object as its last line.
Peak RSS is the whole process's high-water mark (Linux reports KiB).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from fedtower.data.splits import temporal_split
from fedtower.data.synthetic import SyntheticConfig, generate
from fedtower.data.weights import BehaviourWeights


def main(argv: list[str] | None = None) -> dict[str, float | int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--mean-events", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = SyntheticConfig(
        num_users=args.users,
        num_items=args.items,
        mean_events_per_user=args.mean_events,
        seed=args.seed,
    )
    started = time.perf_counter()
    dataset = generate(config)
    generated = time.perf_counter()
    interactions = BehaviourWeights().to_interactions(dataset.events, dataset.catalogue.index)
    weighted = time.perf_counter()
    train, test = temporal_split(interactions)
    split = time.perf_counter()

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "seconds": round(generated - started, 3),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "events": len(dataset.events),
        "users": config.num_users,
        "items": config.num_items,
        "interactions": len(interactions),
        "interactions_seconds": round(weighted - generated, 3),
        "split_seconds": round(split - weighted, 3),
        "train": len(train),
        "test": len(test),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
