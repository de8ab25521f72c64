"""A real deployment on loopback (flower-superlink + 2 flower-supernodes + `flwr run`) per device.

    python benchmarks/gpu_deployment.py --devices cpu cuda --modes nodp dp-user

Uses the same helpers as tests/test_deployment.py (every process stopped at
the end). Per device and mode: start / run / stop seconds, the run's status,
the server's metrics rows (NDCG@20 per evaluated round, train rows), and the
ClientApp errors found in the SuperNodes' logs. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedtower.server.run_dir import RunDirectory  # noqa: E402
from tests.deployment_utils import prepare_sites, run_to_completion  # noqa: E402

MODES = {"nodp": {}, "dp-user": {"privacy-unit": "user", "noise-multiplier": 1.0, "dp-batch-size": 8}}


def run_one(args, device: str, mode: str, root: Path) -> dict:
    sites = prepare_sites(args.data, 2, root / "sites")
    config = {
        "data": args.data, "num-server-rounds": args.rounds, "eval-every": 1, "dim": args.dim,
        "local-epochs": args.local_epochs, "device": device, "min-available-nodes": 2, "min-train-nodes": 2,
        "min-evaluate-nodes": 2, "round-timeout": 120.0, "output-dir": str(root / "runs"), "run-name": "gpu",
        **MODES[mode],
    }  # fmt: skip
    result = {"device": device, "mode": mode}
    try:
        done = run_to_completion(root / "flower", sites, config, timeout=args.timeout)
        result.update(ok=True, run_id=done.run_id, seconds={k: round(v, 2) for k, v in done.seconds.items()})
        log_dir = done.log_dir
    except Exception as err:
        result.update(ok=False, error=f"{type(err).__name__}: {err}"[:1500])
        log_dir = root / "flower" / "logs"
    run_path = root / "runs" / "gpu"
    if run_path.exists():
        history = RunDirectory(run_path, create=False).history()
        result["evaluate"] = [{k: r.get(k) for k in ("round", "ndcg@20", "users")}
                              for r in history if r["phase"] == "evaluate"]  # fmt: skip
        result["train_rows"] = [{k: v for k, v in r.items() if k in ("round", "train-seconds", "train-loss",
                                                                    "num-examples", "budget-exhausted")}
                                for r in history if r["phase"] == "train"]  # fmt: skip
    errors = []
    for log in sorted(log_dir.glob("*.log")) if log_dir.exists() else []:
        text = log.read_text(errors="replace")
        errors += [f"{log.name}: {line.strip()[:300]}" for line in text.splitlines()
                   if re.search(r"Error|Traceback|Exception", line)][:8]  # fmt: skip
        if args.keep_logs:
            dest = Path(args.keep_logs) / f"{device}-{mode}"
            dest.mkdir(parents=True, exist_ok=True)
            (dest / log.name).write_text(text[-200_000:])
    result["log_errors"] = errors[:20]
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic:users=600,items=2000,seed=0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("--keep-logs", default="", help="copy every process's log into this folder")
    args = parser.parse_args(argv)
    # `timeout` sends SIGTERM: exit through Python so the deployment's teardown stops every Flower process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs = []
    for mode in args.modes:
        for device in args.devices:
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(run_one(args, device, mode, Path(tmp)))
    summary = {"data": args.data, "rounds": args.rounds, "dim": args.dim, "runs": runs}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
