"""Requests per second and latency of POST /recommend over loopback, against a real `fedtower serve`.

    python benchmarks/serving_http.py --items 100000

1. A node state dir is made by one real training round (train_on_node, synthetic
   data with --items items and --users users, dim 64), or taken from --state-dir.
2. `fedtower serve` runs in its own process (bearer token, loopback, --precision).
3. A bounded load generator (asyncio, raw HTTP/1.1 over --concurrency keep-alive
   connections) sends --warmup unmeasured requests, then --requests measured ones
   or stops at --time-limit seconds, whichever comes first; each request asks for
   the top 10 of a random known user.

Latency is from writing the request to reading the whole response. The load
generator shares the machine's cores with the server; the load average before
and after is reported with the figures. JSON on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.flower_utils builds the Flower message for the training round


def make_state(root: Path, items: int, users: int, dim: int) -> Path:
    """A node state dir after one real (non-private) training round on synthetic data."""
    from fedtower.client.handlers import train_on_node
    from fedtower.config import RunSettings
    from fedtower.server.federation import initial_item_tower
    from tests.flower_utils import node_context, server_message, task_identity

    settings = RunSettings(data=f"synthetic:users={users},items={items},seed=1", num_sites=1, dim=dim,
                           local_epochs=1, output_dir=str(root), run_name="serving-http", history_len=50,
                           loss="sampled-softmax")  # fmt: skip
    state_dir = root / "state"
    state_dir.mkdir(mode=0o700)
    node = {"partition-id": 0, "num-partitions": 1, "state-dir": str(state_dir), "allow-plaintext-state": True}
    with task_identity():
        train_on_node(server_message(initial_item_tower(settings), node_id=1),
                      node_context(node, settings.to_run_config()))  # fmt: skip
    return state_dir


def known_users(state_dir: Path) -> list[str]:
    from fedtower.client.state import ClientStateStore

    return list(ClientStateStore(state_dir, create=False).load("users")["users"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(state_dir: Path, token_file: Path, port: int, precision: str, threads: int, log_path: Path,
                 index: str = "auto"):
    command = [sys.executable, "-m", "fedtower.cli", "serve", "--state-dir", str(state_dir), "--port", str(port),
               "--token-file", str(token_file), "--precision", precision, "--threads", str(threads),
               "--index", index]  # fmt: skip
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                               env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fedtower serve exited with {process.returncode}: {log_path.read_text()}")
        with contextlib.suppress(OSError):  # not listening yet
            with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                probe.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n")
                if probe.recv(64).startswith(b"HTTP/1.1 200"):
                    return process
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("fedtower serve did not answer /health within 300 s")


def stop_server(process) -> None:
    process.terminate()  # by its own pid, never by name
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def request_bytes(token: str, user: str, k: int) -> bytes:
    body = json.dumps({"user": user, "k": k}).encode()
    head = (f"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


async def one_request(reader, writer, payload: bytes) -> int:
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    await reader.readexactly(length)
    return status


async def load(port: int, payloads: list[bytes], total: int, concurrency: int, time_limit: float) -> dict:
    """`total` requests over `concurrency` connections, or until `time_limit`; latencies in seconds."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    issued = 0
    deadline = time.perf_counter() + time_limit

    async def worker() -> None:
        nonlocal issued
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while issued < total and time.perf_counter() < deadline:
                issued += 1
                payload = random.choice(payloads)
                started = time.perf_counter()
                status = await one_request(reader, writer, payload)
                latencies.append(time.perf_counter() - started)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "statuses": statuses, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--requests", type=int, default=5000, help="Measured requests (upper bound).")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--time-limit", type=float, default=60.0, help="Seconds for the measured phase, at most.")
    parser.add_argument("--concurrency", type=int, default=4, help="Keep-alive connections in flight.")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    parser.add_argument("--index", default="auto", choices=["auto", "exact", "ivf"], help="serve --index")
    parser.add_argument("--threads", type=int, default=1, help="The server's compute threads (serve --threads).")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--state-dir", type=Path, help="Serve this state dir instead of making one.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    random.seed(args.seed)

    with tempfile.TemporaryDirectory(prefix="fedtower-http-bench-") as tmp:
        root = Path(tmp)
        began = time.perf_counter()
        state_dir = args.state_dir or make_state(root, args.items, args.users, args.dim)
        print(f"state ready in {time.perf_counter() - began:.1f} s: {state_dir}", flush=True)
        token = secrets.token_urlsafe(32)
        token_file = root / "token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        payloads = [request_bytes(token, user, args.k) for user in known_users(state_dir)]
        port = free_port()
        process = start_server(state_dir, token_file, port, args.precision, args.threads, root / "serve.log",
                               args.index)
        try:
            asyncio.run(load(port, payloads, args.warmup, args.concurrency, args.time_limit))
            load_before = os.getloadavg()
            run = asyncio.run(load(port, payloads, args.requests, args.concurrency, args.time_limit))
            load_after = os.getloadavg()
        finally:
            stop_server(process)

    latencies = np.asarray(run["latencies"]) * 1e3
    ok = run["statuses"].get(200, 0)
    result = {
        "benchmark": "serving_http",
        "items": args.items,
        "users": args.users,
        "dim": args.dim,
        "precision": args.precision,
        "index": args.index,
        "concurrency": args.concurrency,
        "threads": args.threads,
        "requests": len(latencies),
        "ok": ok,
        "statuses": {str(k): v for k, v in run["statuses"].items()},
        "seconds": round(run["seconds"], 3),
        "requests_per_s": round(len(latencies) / run["seconds"], 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 3),
        "p99_ms": round(float(np.percentile(latencies, 99)), 3),
        "max_ms": round(float(latencies.max()), 3),
        "cpu_count": os.cpu_count(),
        "loadavg_1m_before": round(load_before[0], 2),
        "loadavg_1m_after": round(load_after[0], 2),
    }
    result["target_met"] = bool(result["requests_per_s"] >= 500 and result["p99_ms"] <= 20 and ok == len(latencies))
    print(f"{result['requests']} requests in {result['seconds']} s: {result['requests_per_s']} req/s, "
          f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms (load {load_before[0]:.2f} -> {load_after[0]:.2f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
