"""Bytes each site sends and receives per round, fp32 against compressed updates, and what it costs in quality.

    python benchmarks/communication.py                       # bytes at 10^4, 10^5, 10^6 items
    python benchmarks/communication.py --quality ../shared/data/ml-latest-small

Bytes: the item tower of a synthetic catalogue of each size (dim --dim, the run's model), one round's
delta (a trained-like update: Gaussian, 1% of the weights' scale) encoded with each codec, counted as
Flower serializes the reply (protobuf of the RecordDict). With --quality, the federation (Flower's
simulation engine, --sites sites, --rounds rounds) runs once per codec on the same data and partitions,
and the JSON gives each codec's NDCG@20 and its relative change against fp32. Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile

import numpy as np


def reply_bytes(arrays: dict[str, np.ndarray]) -> int:
    from flwr.app import Array, ArrayRecord, RecordDict
    from flwr.common.serde import recorddict_to_proto

    record = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})})
    return len(recorddict_to_proto(record).SerializeToString())


def bytes_at(items: int, dim: int, codecs: list[str]) -> dict:
    from fedtower.compression import encode_tower
    from fedtower.config import RunSettings
    from fedtower.server.federation import initial_item_tower

    settings = RunSettings(data=f"synthetic:users=100,items={items},seed=0", dim=dim)
    tower = {k: a.numpy() for k, a in initial_item_tower(settings).items()}
    rng = np.random.default_rng(0)
    trained = {k: v + 0.01 * np.std(v) * rng.standard_normal(v.shape).astype(np.float32) for k, v in tower.items()}
    sent = reply_bytes(tower)  # the coordinator sends the fp32 tower
    row = {"values": int(sum(v.size for v in tower.values())), "sent_bytes": sent}
    for codec in codecs:
        encoded = trained if codec == "fp32" else encode_tower(trained, tower, codec=codec)
        row[f"received_bytes_{codec}"] = reply_bytes(encoded)
    return row


def quality(data: str, sites: int, rounds: int, dim: int, codecs: list[str]) -> dict:
    from fedtower.config import RunSettings
    from fedtower.simulations.runner import simulate

    out = tempfile.mkdtemp(prefix="fedtower-comm-")
    scores = {}
    for codec in codecs:
        settings = RunSettings.from_run_config({"data": data, "partitioning": "sites", "num-sites": sites,
                                                "num-server-rounds": rounds, "eval-every": rounds, "dim": dim,
                                                "update-compression": codec, "output-dir": out,
                                                "run-name": f"comm-{codec}"})  # fmt: skip
        result = simulate(settings)
        final = [row for row in result["history"] if row["phase"] == "evaluate"][-1]
        scores[codec] = final["ndcg@20"]
        print(f"quality {codec}: ndcg@20 {scores[codec]:.4f}", file=sys.stderr)
    return scores


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--codecs", nargs="+", default=["fp32", "fp16", "int8"])
    parser.add_argument("--quality", default=None, help="a dataset: also run the federation once per codec")
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    result: dict = {"benchmark": "communication", "dim": args.dim, "codecs": args.codecs, "sizes": {}}
    print(f"{'items':>10} {'sent':>12}" + "".join(f" {'recv ' + c:>12}" for c in args.codecs), file=sys.stderr)
    for items in args.items:
        row = bytes_at(items, args.dim, args.codecs)
        result["sizes"][str(items)] = row
        print(f"{items:>10,} {row['sent_bytes']:>12,}" + "".join(f" {row[f'received_bytes_{c}']:>12,}"
                                                               for c in args.codecs), file=sys.stderr)  # fmt: skip
        for codec in args.codecs:
            if codec != "fp32":
                result[f"bytes_ratio_{codec}@{items}"] = row["received_bytes_fp32"] / row[f"received_bytes_{codec}"]
    if "int8" in args.codecs:  # the key: fp32 over the most compressed codec
        for items in args.items:
            result[f"bytes_ratio@{items}"] = result[f"bytes_ratio_int8@{items}"]
    if args.quality:
        scores = quality(args.quality, args.sites, args.rounds, args.dim, args.codecs)
        result["ndcg@20"] = scores
        for codec in args.codecs:
            if codec != "fp32":
                result[f"ndcg_relative_change_{codec}"] = scores[codec] / scores["fp32"] - 1
        if "int8" in args.codecs:
            result["ndcg_relative_change"] = result["ndcg_relative_change_int8"]
    result.update({"threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0), "load_average": os.getloadavg()})
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
