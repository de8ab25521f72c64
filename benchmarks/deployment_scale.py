"""How many SuperNodes one machine holds: nodes, memory per node, seconds per round.

    python benchmarks/deployment_scale.py --nodes 2 4 8 16 --rounds 2

For each node count, in order: a real `flower-superlink` and that many real
`flower-supernode`s on loopback (TLS and node authentication with --secure),
each with its own slice of a synthetic dataset, run a short federation with
`flwr run` (every node trains and evaluates every round). While it runs, the
resident memory of each SuperNode's whole process tree (the SuperNode, its
SuperExec and the ClientApp processes Flower starts per message, plus the
site's worker with --site-worker) is sampled from /proc, and the time of each round is read from the run directory's
metrics as they appear. Every process is stopped before the next size.

It stops growing at the first size whose run fails, or whose seconds per round
exceed --max-round-seconds, or that would leave less than --min-free-mib of
memory by the last size's figures. Progress goes to stderr, one JSON line per
size to stdout, and the summary is the last JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the loopback deployment harness lives with the tests

from fedtower.local_superlink import process_table  # noqa: E402
from tests.deployment_utils import local_deployment, prepare_sites  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE / 2**20
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0.0


def site_worker_pids() -> dict[str, list[int]]:
    """State dir -> pids of the site workers serving it (they run in their own session)."""
    found: dict[str, list[int]] = {}
    for pid, (_, argv) in process_table().items():
        if "fedtower.client.site_worker" in argv and "--state-dir" in argv:
            found.setdefault(argv[argv.index("--state-dir") + 1], []).append(pid)
    return found


def mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class MemorySampler(threading.Thread):
    """Every `period` s: the RSS of each SuperNode's process tree; keeps each one's peak."""

    def __init__(self, deployment, names: list[str], state_dirs: dict[str, Path], period: float = 0.5):
        super().__init__(daemon=True)
        self.deployment, self.names, self.period = deployment, names, period
        self.state_dirs = state_dirs  # a site worker leaves its SuperNode's tree: found by its --state-dir
        self.peak = {name: 0.0 for name in names}
        self.peak_total, self.min_available = 0.0, mem_available_mib()
        self.stop_event = threading.Event()

    def sample(self) -> dict[str, float]:
        tracker = self.deployment.tracker
        workers = site_worker_pids()
        return {name: sum(rss_mib(pid) for pid in tracker.tree(name)) + sum(rss_mib(pid) for pid in
                workers.get(str(self.state_dirs.get(name)), [])) for name in self.names}  # fmt: skip

    def run(self) -> None:
        while not self.stop_event.is_set():
            now = self.sample()
            for name, mib in now.items():
                self.peak[name] = max(self.peak[name], mib)
            self.peak_total = max(self.peak_total, sum(now.values()))
            self.min_available = min(self.min_available, mem_available_mib())
            self.stop_event.wait(self.period)


def round_times(metrics_path: Path, started: float, rounds: int, timeout: float, popen) -> list[float]:
    """Wall time at which each round's train row appears in metrics.json (seconds after `started`)."""
    seen: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < rounds and time.monotonic() < deadline and popen.poll() is None:
        try:
            rows = json.loads(metrics_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or mid-replace
            rows = []
        for row in rows:
            if row.get("phase") == "train" and row["round"] not in seen:
                seen[row["round"]] = time.monotonic() - started
        time.sleep(0.2)
    return [seen[r] for r in sorted(seen)]


def one_size(nodes: int, args, root: Path) -> dict:
    users = nodes * args.users_per_node
    data = f"synthetic:users={users},items={args.items},seed=0"
    sites = prepare_sites(data, nodes, root / "sites")
    if args.site_worker:
        for site in sites:
            site.extra_node_config.update({"site-worker": True, "site-worker-idle-seconds": 300.0})
    config = {
        "data": data, "num-server-rounds": args.rounds, "eval-every": 1, "dim": 16, "history-len": 50,
        "local-epochs": 1, "num-negatives": 32, "device": "cpu", "min-available-nodes": nodes,
        "min-train-nodes": nodes, "min-evaluate-nodes": nodes, "round-timeout": args.max_round_seconds * 2,
        "output-dir": str(root / "runs"), "run-name": "scale",
    }  # fmt: skip
    if args.dp:
        config.update({"noise-multiplier": 1.0, "dp-batch-size": 16})
    result: dict = {"nodes": nodes, "users": users, "items": args.items, "rounds": args.rounds,
                    "secure": args.secure, "dp": args.dp, "site_worker": args.site_worker}  # fmt: skip
    began = time.monotonic()
    with local_deployment(root / "flower", sites, secure=args.secure,
                          startup_timeout=60 + 5 * nodes) as deployment:  # fmt: skip
        result["start_seconds"] = round(time.monotonic() - began, 1)
        names = [f"supernode-{i}" for i in range(nodes)]
        sampler = MemorySampler(deployment, names, {name: site.state_dir for name, site in zip(names, sites,
                                                                                             strict=True)})
        idle = sampler.sample()
        result["idle_mib_per_node"] = round(sum(idle.values()) / nodes, 1)
        sampler.start()
        started = time.monotonic()
        popen = deployment.start_run(ROOT, config)
        timeout = args.max_round_seconds * (args.rounds + 2)
        times = round_times(root / "runs" / "scale" / "metrics.json", started, args.rounds, timeout, popen)
        try:
            run_id, _ = deployment.wait_run(popen, timeout)
            status = deployment.run_status(run_id)
        except (RuntimeError, TimeoutError) as err:
            status = f"failed: {str(err).splitlines()[0]}"
        sampler.stop_event.set()
        sampler.join()
        result.update(
            status=status,
            run_seconds=round(time.monotonic() - started, 1),
            round_end_seconds=[round(t, 1) for t in times],
            # Round 1 includes the ServerApp's start; later rounds are the steady state.
            seconds_per_round=round((times[-1] - times[0]) / (len(times) - 1), 1) if len(times) > 1
            else (round(times[0], 1) if times else None),
            peak_mib_per_node=round(max(sampler.peak.values()), 1),
            mean_peak_mib_per_node=round(sum(sampler.peak.values()) / nodes, 1),
            peak_mib_all_nodes=round(sampler.peak_total, 1),
            min_mem_available_mib=round(sampler.min_available, 1),
        )  # fmt: skip
    result["stop_seconds"] = round(time.monotonic() - began - result["start_seconds"] - result["run_seconds"], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8, 16, 24, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--users-per-node", type=int, default=40)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--secure", action=argparse.BooleanOptionalAction, default=True,
                        help="TLS and SuperNode authentication (the partner-site setup)")
    parser.add_argument("--dp", action="store_true", help="example-level DP (noise multiplier 1)")
    parser.add_argument("--site-worker", action="store_true",
                        help="each site keeps a long-lived worker (node config site-worker = true)")
    parser.add_argument("--max-round-seconds", type=float, default=240.0)
    parser.add_argument("--min-free-mib", type=float, default=2048.0)
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # `timeout`/`kill` send SIGTERM: exit through Python so the deployment's teardown stops every Flower
    # process (without this, SIGTERM killed the script and left the SuperLink and SuperNodes running).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.site_worker:
        # The workers' sockets need a short private dir (a Unix socket path holds 107 bytes); the
        # SuperNodes inherit it.
        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="ft-run-", dir="/tmp")

    sizes, stopped_because = [], "every size ran"
    for nodes in sorted(args.nodes):
        if sizes:
            last = sizes[-1]
            per_node = last["peak_mib_all_nodes"] / last["nodes"]
            need = per_node * (nodes - last["nodes"])
            if last["min_mem_available_mib"] - need < args.min_free_mib:
                stopped_because = f"{nodes} nodes would leave under {args.min_free_mib:.0f} MiB free"
                break
        print(f"[deployment_scale] {nodes} SuperNodes ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=f"fedtower-scale-{nodes}-") as tmp:
            result = one_size(nodes, args, Path(tmp))
        sizes.append(result)
        print(json.dumps(result), flush=True)
        print(f"[deployment_scale] {nodes:>3} nodes: {result['status']}, {result['seconds_per_round']} s/round, "
              f"peak {result['peak_mib_per_node']} MiB/node (idle {result['idle_mib_per_node']})",
              file=sys.stderr, flush=True)  # fmt: skip
        if result["status"] != "finished:completed":
            stopped_because = f"the run with {nodes} nodes did not complete"
            break
        if (result["seconds_per_round"] or 0) > args.max_round_seconds:
            stopped_because = f"{nodes} nodes took over {args.max_round_seconds:.0f} s per round"
            break

    completed = [s for s in sizes if s["status"] == "finished:completed"]
    print("\n nodes  s/round  peak MiB/node  idle MiB/node  all nodes MiB  status", file=sys.stderr)
    for s in sizes:
        print(f"{s['nodes']:>6} {s['seconds_per_round'] or float('nan'):>8} {s['peak_mib_per_node']:>14} "
              f"{s['idle_mib_per_node']:>14} {s['peak_mib_all_nodes']:>14}  {s['status']}",
              file=sys.stderr)  # fmt: skip
    summary = {
        "benchmark": "deployment_scale", "cpu_count": os.cpu_count(), "secure": args.secure, "dp": args.dp,
        "site_worker": args.site_worker, "load_average_after": os.getloadavg()[0],
        "max_nodes": max((s["nodes"] for s in completed), default=0), "stopped_because": stopped_because,
        "sizes": sizes,
    }  # fmt: skip
    if completed:
        best = max(completed, key=lambda s: s["nodes"])
        summary.update(nodes=best["nodes"], seconds_per_round=best["seconds_per_round"],
                       peak_mib_per_node=best["peak_mib_per_node"],
                       idle_mib_per_node=best["idle_mib_per_node"])  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
