"""The client's training paths on CPU and on CUDA, through fedtower's own client handlers.

    python benchmarks/gpu_paths.py --data ../shared/data/ml-latest-small --sites 5 --rounds 3 \\
        --devices cpu cuda --modes nodp dp-user dp-interaction

For each device and mode it runs a small in-process federation: every round
each site's `train_on_node` (exactly what a SuperNode's ClientApp calls) on
partition p of `--sites`, FedAvg of the returned item towers (example-weighted
without DP, equal weights under DP, as the server does), and after the last
round `evaluate_on_node` on every site, merged into NDCG@20 / Recall@20.
Prints per run: seconds per round (first round apart: it holds CUDA's start),
NDCG@20, peak CUDA memory, or the error a path raised. The last line is one
JSON object with every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from fedtower.client.handlers import evaluate_on_node, train_on_node
from fedtower.config import RunSettings
from fedtower.metrics import RankingSums
from fedtower.server.federation import initial_item_tower

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.flower_utils import node_context, server_message, task_identity  # noqa: E402

MODES = {
    "nodp": {},
    "dp-user": {"privacy-unit": "user", "noise-multiplier": 1.0},
    "dp-interaction": {"privacy-unit": "interaction", "noise-multiplier": 1.0},
}


def fedavg(replies: list, weighted: bool) -> ArrayRecord:
    states = [r.content["arrays"].to_torch_state_dict() for r in replies]
    weights = [float(r.content["metrics"]["num-examples"]) if weighted else 1.0 for r in replies]
    total = sum(weights)
    return ArrayRecord({k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) / total
                        for k in states[0]})  # fmt: skip


def run_one(args, device: str, mode: str, root: Path) -> dict:
    overrides = {**MODES[mode], **json.loads(args.overrides.get(mode, "{}"))}
    settings = RunSettings.from_run_config({
        **RunSettings(data=args.data, num_sites=args.sites, dim=args.dim, local_epochs=args.local_epochs,
                      num_server_rounds=args.rounds, device=device, output_dir=str(root),
                      run_name=f"{device}-{mode}", seed=args.seed).to_run_config(),
        **overrides,
    })  # fmt: skip
    run_config = settings.to_run_config()
    result = {"device": device, "mode": mode, "overrides": overrides, "round_seconds": []}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(args.seed)
    tower = initial_item_tower(settings)
    try:
        with task_identity():
            for server_round in range(1, args.rounds + 1):
                started = time.perf_counter()
                replies = []
                for p in range(args.sites):
                    context = node_context({"partition-id": p, "num-partitions": args.sites}, run_config,
                                           node_id=p + 1)  # fmt: skip
                    message = server_message(tower, node_id=p + 1, server_round=server_round,
                                             run_name=settings.run_name)  # fmt: skip
                    replies.append(train_on_node(message, context))
                if device == "cuda":
                    torch.cuda.synchronize()
                tower = fedavg(replies, weighted=not settings.dp_enabled)
                seconds = time.perf_counter() - started
                result["round_seconds"].append(round(seconds, 3))
                print(f"  {device} {mode} round {server_round}: {seconds:.2f} s", flush=True)
            started = time.perf_counter()
            sums = RankingSums()
            for p in range(args.sites):
                context = node_context({"partition-id": p, "num-partitions": args.sites}, run_config,
                                       node_id=p + 1)  # fmt: skip
                message = server_message(tower, node_id=p + 1, message_type="evaluate",
                                         server_round=args.rounds, run_name=settings.run_name)  # fmt: skip
                sums = sums + RankingSums.from_dict(dict(evaluate_on_node(message, context).content["metrics"]))
            result["eval_seconds"] = round(time.perf_counter() - started, 3)
        metrics = sums.finalize()
        result.update({"ndcg@20": round(metrics["ndcg@20"], 4), "recall@20": round(metrics["recall@20"], 4),
                       "users": metrics["users"], "ok": True})  # fmt: skip
    except Exception as err:  # a path that breaks is a finding: record it, go on with the others
        result.update({"ok": False, "error": f"{type(err).__name__}: {err}"[:600],
                       "traceback": traceback.format_exc()[-2500:]})  # fmt: skip
        print(result["traceback"], flush=True)
    rounds = result["round_seconds"]
    if len(rounds) > 1:
        result["median_round_seconds_after_first"] = round(statistics.median(rounds[1:]), 3)
    if device == "cuda":
        result["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--override", action="append", default=[], metavar="MODE=JSON",
                        help='extra run config for one mode, e.g. dp-interaction={"dp-batch-size": 64}')  # fmt: skip
    args = parser.parse_args(argv)
    args.overrides = dict(item.split("=", 1) for item in args.override)
    if "cuda" in args.devices:
        torch.zeros(1, device="cuda")  # CUDA's context start stays out of the timings
        print(f"CUDA: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    print(f"torch CPU threads: {torch.get_num_threads()}", flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            for device in args.devices:
                run = run_one(args, device, mode, Path(tmp))
                runs.append(run)
                # Printed as soon as it is known: a run cut off later does not lose this one.
                figures = {k: run.get(k) for k in ("round_seconds", "median_round_seconds_after_first",
                                                  "eval_seconds", "ndcg@20", "recall@20", "cuda_peak_mib")}  # fmt: skip
                print(f"{device:>4} {mode:<15} {'ok' if run['ok'] else 'FAILED: ' + run['error'][:200]} "
                      f"{figures}", flush=True)  # fmt: skip
    summary = {"data": args.data, "sites": args.sites, "rounds": args.rounds, "dim": args.dim,
               "local_epochs": args.local_epochs, "torch": torch.__version__,
               "cpu_threads": torch.get_num_threads(), "runs": runs}  # fmt: skip
    for run in runs:
        run.pop("traceback", None)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
