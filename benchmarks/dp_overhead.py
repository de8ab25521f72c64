"""Cost of DP-SGD on embedding tables: the sparse lazy-noise path against Opacus.

    python benchmarks/dp_overhead.py --items 10000 100000 1000000
    python benchmarks/dp_overhead.py --items 100000 --threads 2 --contend 1   # a busy machine

For each catalogue size, one two-tower model (item id table + bias, a user
table of --users rows, --dim dims) trains on the same pre-drawn batches of
--batch interactions (1 positive + --negatives sampled items each), and each
method runs in its own fresh process so that its peak memory is its own:

Each sample scores 1 positive against --negatives sampled items; with
--negatives-mode shared (the default, and what fedtower's DP trainer does) the
negatives are one set per step, so a step reads about B + M distinct item rows;
per-sample negatives read about B x (1 + M).

- nodp_dense:  plain autograd + SGD over the whole tables (context only)
- nodp_sparse: sparse row updates, the best of `nn.Embedding(sparse=True)` + SGD
               and a hand-written touched-rows update (the non-private reference)
- dp_sparse:   fedtower's DP path (lazy noise on touched rows; `DPTrainer`)
- opacus_ghost: Opacus ghost clipping (per-sample norms without per-sample grads)
- opacus_hooks: Opacus per-sample gradient hooks (skipped where B x N x d floats
               cannot fit in memory)

plus the time to release the DP table (draw all pending noise once per round),
and a real DP client round (`DPTrainer.run`, interaction level) at the largest
size. Ratios compare methods measured in this one run. Progress goes to stderr;
the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

METHODS = ("nodp_dense", "nodp_sparse", "dp_sparse", "opacus_ghost", "opacus_hooks")
HOOKS_LIMIT_BYTES = 4 * 2**30  # per-sample table gradients larger than this are not attempted


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------ one method
def worker(args) -> dict:
    import torch

    from fedtower.client.dp_training import DPConfig, DPTrainer
    from fedtower.models.two_tower import PAD, TwoTower, TwoTowerConfig

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    n, users, batch = args.items[0], args.users, args.batch
    device = torch.device(args.device)
    model = TwoTower(TwoTowerConfig(num_items=n, num_users=users, dim=args.dim)).to(device)
    generator = torch.Generator().manual_seed(1)

    def candidates():
        positives = torch.randint(0, n, (batch, 1), generator=generator)
        if args.negatives_mode == "shared":  # as fedtower's DP trainer: one set per step
            negatives = torch.randint(0, n, (1, args.negatives), generator=generator).expand(batch, -1)
        else:
            negatives = torch.randint(0, n, (batch, args.negatives), generator=generator)
        return torch.cat([positives, negatives], dim=1)  # B x (1 + M)

    batches = [(torch.randint(0, users, (batch,), generator=generator).to(device), candidates().to(device))
               for _ in range(16)]  # fmt: skip
    no_history = torch.full((batch, 1), PAD, dtype=torch.long, device=device)
    tables = [model.item_tower.id_embedding, model.item_tower.bias, model.user_tower.embedding]

    def per_sample_loss(users_, candidates):
        scores = model(users_, no_history, candidates)  # B x (1 + M)
        return -torch.log_softmax(scores, dim=-1)[:, 0]  # B

    method = args.worker
    release_seconds = None
    if method == "nodp_dense":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

        def step(users_, candidates):
            optimizer.zero_grad(set_to_none=True)
            per_sample_loss(users_, candidates).sum().backward()
            optimizer.step()

    elif method == "nodp_sparse":
        step = _best_sparse_step(model, tables, per_sample_loss, batches, torch)

    elif method in ("dp_sparse", "opacus_hooks"):
        path = "sparse" if method == "dp_sparse" else "opacus"
        config = DPConfig(unit="interaction", noise_multiplier=1.0, max_grad_norm=1.0,
                          sample_rate=min(1.0, batch / users), steps=1, lr=1e-3, table_lr=0.1,
                          embedding_path=path)  # fmt: skip
        trainer = DPTrainer(model, config)
        model.train()

        def step(users_, candidates):
            trainer.zero_grads()
            per_sample_loss(users_, candidates).sum().backward()
            trainer.private_update(batch, expected_batch=float(batch))

    elif method == "opacus_ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        module = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, use_ghost_clipping=True,
                                                      loss_reduction="sum")  # fmt: skip
        optimizer = DPOptimizerFastGradientClipping(
            torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
            expected_batch_size=batch, loss_reduction="sum",
        )  # fmt: skip
        model.train()

        def step(users_, candidates):
            optimizer.zero_grad(set_to_none=True)
            DPTensorFastGradientClipping(module, optimizer, per_sample_loss(users_, candidates), "sum").backward()
            optimizer.step()

    else:
        raise SystemExit(f"unknown method {method!r}")

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base = rss_mib()
    for i in range(args.warmup):
        step(*batches[i % len(batches)])
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated() / 2**20
    done, started = 0, time.perf_counter()
    while done < args.min_steps or time.perf_counter() - started < args.seconds:
        step(*batches[done % len(batches)])
        done += 1
    sync()
    elapsed = time.perf_counter() - started
    if method == "dp_sparse":
        pending = sum(t.pending_rows() for t in trainer.tables)
        t0 = time.perf_counter()
        trainer.release()
        sync()
        release_seconds = time.perf_counter() - t0
    result = {
        "method": method, "items": n, "steps": done, "seconds": elapsed, "steps_per_s": done / elapsed,
        "ms_per_step": 1000 * elapsed / done, "base_rss_mib": base, "peak_rss_mib": peak_rss_mib(),
    }  # fmt: skip
    if release_seconds is not None:
        result.update(release_seconds=release_seconds, rows_released=pending)
    if cuda:
        result.update(device=torch.cuda.get_device_name(), base_gpu_mib=base_gpu,
                      peak_gpu_mib=torch.cuda.max_memory_allocated() / 2**20)  # fmt: skip
    if method == "nodp_sparse":
        result["variant"] = step.variant
    return result


def _best_sparse_step(model, tables, per_sample_loss, batches, torch):
    """Sparse row updates, two ways; keep the faster (both touch only the rows a batch read)."""
    lr = 0.1

    # (a) PyTorch's sparse embedding gradients with SGD.
    for table in tables:
        table.sparse = True
    sparse_optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def autograd_sparse(users_, candidates):
        sparse_optimizer.zero_grad(set_to_none=True)
        per_sample_loss(users_, candidates).sum().backward()
        sparse_optimizer.step()

    # (b) Read rows through a leaf and update exactly those rows.
    reads = []

    def capture(module, args, output):
        leaf = output.detach().requires_grad_(True)
        reads.append((module, args[0], leaf))
        return leaf

    def rows_update(users_, candidates):
        reads.clear()
        per_sample_loss(users_, candidates).sum().backward()
        with torch.no_grad():
            for module, ids, leaf in reads:
                rows, where = torch.unique(ids.flatten(), return_inverse=True)
                grad = leaf.grad.new_zeros(len(rows), leaf.shape[-1])
                grad.index_add_(0, where, leaf.grad.reshape(-1, leaf.shape[-1]))
                module.weight[rows] -= lr * grad

    def timed(step, hooks=()):
        for _ in range(3):
            step(*batches[0])
        t0 = time.perf_counter()
        for i in range(20):
            step(*batches[i % len(batches)])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        for h in hooks:
            h.remove()
        return time.perf_counter() - t0

    a = timed(autograd_sparse)
    for table in tables:
        table.sparse = False
    hooks = [t.register_forward_hook(capture) for t in tables]
    b = timed(rows_update, hooks)
    if a <= b:
        for table in tables:
            table.sparse = True
        autograd_sparse.variant = "nn.Embedding(sparse=True) + SGD"
        return autograd_sparse
    for table in tables:
        table.register_forward_hook(capture)
    rows_update.variant = "touched-rows index update"
    return rows_update


# --------------------------------------------------------- a real DP client
def client_worker(args) -> dict:
    import torch

    from fedtower.client.dp_training import DPConfig, DPTrainer, num_dp_samples
    from fedtower.data.prepared import prepare_split
    from fedtower.data.synthetic import SyntheticConfig, generate
    from fedtower.models.two_tower import TwoTower, TwoTowerConfig
    from fedtower.privacy.accounting import ClientAccountant, default_delta

    torch.set_num_threads(args.threads)
    n = args.items[0]
    t0 = time.perf_counter()
    dataset = generate(SyntheticConfig(num_users=args.client_users, num_items=n, seed=0))
    split = prepare_split(dataset)
    histories = split.train
    samples = num_dp_samples("interaction", histories)
    model = TwoTower(TwoTowerConfig(num_items=n, num_users=len(histories), dim=args.dim))
    setup = time.perf_counter() - t0
    rate = min(1.0, args.batch / samples)
    config = DPConfig(unit="interaction", noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=rate,
                      steps=args.client_steps, lr=1e-3, table_lr=0.1, num_negatives=args.negatives)  # fmt: skip
    base = rss_mib()
    trainer = DPTrainer(model, config)
    t1 = time.perf_counter()
    trainer.run(histories)
    trained = time.perf_counter() - t1
    t2 = time.perf_counter()
    trainer.detach()  # release: every row's pending noise, once
    released = time.perf_counter() - t2
    accountant = ClientAccountant()
    accountant.step(noise_multiplier=1.0, sample_rate=rate, steps=args.client_steps)
    delta = default_delta(samples)
    return {
        "method": "dp_client_round", "items": n, "users": len(histories), "dp_samples": samples,
        "steps": args.client_steps, "setup_seconds": setup, "train_seconds": trained,
        "steps_per_s": args.client_steps / trained, "release_seconds": released,
        "epsilon": accountant.epsilon(delta=delta), "delta": delta,
        "base_rss_mib": base, "peak_rss_mib": peak_rss_mib(),
    }  # fmt: skip


# ------------------------------------------------------------------ driver
def run_worker(args, method: str, items: int) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--items", str(items)]
    for name in ("users", "batch", "dim", "negatives", "negatives_mode", "seconds", "min_steps", "warmup",
                 "threads", "client_users", "client_steps", "device"):  # fmt: skip
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"method": method, "items": items, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


BUSY_LOOP = "while True:\n    pass"


@contextlib.contextmanager
def busy_processes(count: int):
    """`count` processes that each keep one core busy (another job on a shared machine), stopped on exit."""
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    try:
        time.sleep(0.5 if busy else 0.0)  # let them reach the loop before the timed run starts
        yield
    finally:
        for process in busy:
            process.kill()
        for process in busy:
            process.wait()


def contention_rows(args, items: int) -> dict:
    """The sparse non-private and DP steps alone and beside `--contend` busy processes, and the slowdown."""
    rows: dict = {"busy_processes": args.contend}
    for method in ("nodp_sparse", "dp_sparse"):
        alone = run_worker(args, method, items)
        with busy_processes(args.contend):
            contended = run_worker(args, method, items)
        if "steps_per_s" in alone and "steps_per_s" in contended:
            rows[method] = {"alone_steps_per_s": alone["steps_per_s"],
                            "contended_steps_per_s": contended["steps_per_s"],
                            "slowdown": alone["steps_per_s"] / contended["steps_per_s"]}  # fmt: skip
            print(f"[{items:>9,} items] {method:<13} alone {alone['steps_per_s']:8.1f} steps/s, beside "
                  f"{args.contend} busy: {contended['steps_per_s']:8.1f} ({rows[method]['slowdown']:.2f}x slower)",
                  file=sys.stderr)  # fmt: skip
        else:
            rows[method] = {"error": alone.get("error") or contended.get("error")}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--negatives", type=int, default=64)
    parser.add_argument("--negatives-mode", choices=("shared", "per-sample"), default="shared",
                        help="shared: one set of negatives per step (what fedtower's DP trainer does)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time each method at least this long")
    parser.add_argument("--min-steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    parser.add_argument("--client-users", type=int, default=2000)
    parser.add_argument("--client-steps", type=int, default=200)
    parser.add_argument("--skip-client", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (GPU memory is then reported too)")
    parser.add_argument("--contend", type=int, default=0, metavar="N",
                        help="also time the sparse steps beside N busy processes and report the slowdown")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "dp_client":
        print(json.dumps(client_worker(args)))
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return

    results: dict[str, dict] = {}
    for items in args.items:
        row: dict = {}
        for method in METHODS:
            table_grads = args.batch * items * args.dim * 4
            if method == "opacus_hooks" and table_grads > HOOKS_LIMIT_BYTES:
                row[method] = {"skipped": f"per-sample table gradients need {table_grads / 2**30:.1f} GiB"}
                print(f"[{items:>9,} items] {method:<13} skipped", file=sys.stderr)
                continue
            row[method] = run_worker(args, method, items)
            r = row[method]
            shown = f"{r['steps_per_s']:8.1f} steps/s  peak {r['peak_rss_mib']:7.0f} MiB" if "steps_per_s" in r \
                else f"error {r.get('error')}"  # fmt: skip
            print(f"[{items:>9,} items] {method:<13} {shown}", file=sys.stderr)
        nodp, dp = row["nodp_sparse"], row["dp_sparse"]
        if "steps_per_s" in nodp and "steps_per_s" in dp:
            row["ratio_dp_to_nodp"] = nodp["steps_per_s"] / dp["steps_per_s"]  # step-time ratio
            row["memory_ratio_dp_to_nodp"] = dp["peak_rss_mib"] / nodp["peak_rss_mib"]
            # Growth during training, over the model and batches already in memory.
            row["training_growth_mib"] = {m: row[m]["peak_rss_mib"] - row[m]["base_rss_mib"]
                                          for m in METHODS if "peak_rss_mib" in row[m]}  # fmt: skip
            ghost = row["opacus_ghost"]
            if "steps_per_s" in ghost:
                row["opacus_ghost_ratio"] = nodp["steps_per_s"] / ghost["steps_per_s"]
                row["speedup_vs_opacus_ghost"] = dp["steps_per_s"] / ghost["steps_per_s"]
            hooks = row["opacus_hooks"]
            if "steps_per_s" in hooks:
                row["opacus_hooks_ratio"] = nodp["steps_per_s"] / hooks["steps_per_s"]
                row["speedup_vs_opacus_hooks"] = dp["steps_per_s"] / hooks["steps_per_s"]
        if args.contend:
            row["contention"] = contention_rows(args, items)
        results[str(items)] = row
    if not args.skip_client:
        largest = max(args.items)
        args.items = [largest]
        results["client"] = run_worker(args, "dp_client", largest)
        c = results["client"]
        print(f"[{largest:>9,} items] DP client round: {c}", file=sys.stderr)

    print_table(results, file=sys.stderr)
    summary = {"device": args.device, "batch": args.batch, "dim": args.dim, "users": args.users,
               "negatives": args.negatives,
               "negatives_mode": args.negatives_mode, "threads": args.threads, "contend": args.contend,
               "load_average": os.getloadavg(), "results": results}  # fmt: skip
    for items, row in results.items():
        if items != "client":
            for key in ("ratio_dp_to_nodp", "opacus_ghost_ratio"):
                if key in row:
                    summary[f"{key}@{items}"] = row[key]
            for method, contended in row.get("contention", {}).items():
                if isinstance(contended, dict) and "slowdown" in contended:
                    summary[f"{method}_slowdown@{items}"] = contended["slowdown"]
                    if method == "dp_sparse":  # the DP step's throughput beside the busy processes over alone
                        summary[f"contended_throughput_ratio@{items}"] = 1.0 / contended["slowdown"]
    print(json.dumps(summary))


def print_table(results: dict, file) -> None:
    print(f"\n{'items':>10} {'method':<13} {'steps/s':>9} {'ms/step':>9} {'peak MiB':>9}", file=file)
    for items, row in results.items():
        if items == "client":
            continue
        for method in METHODS:
            r = row.get(method, {})
            if "steps_per_s" in r:
                print(f"{int(items):>10,} {method:<13} {r['steps_per_s']:9.1f} {r['ms_per_step']:9.2f} "
                      f"{r['peak_rss_mib']:9.0f}", file=file)  # fmt: skip
            else:
                print(f"{int(items):>10,} {method:<13} {r.get('skipped') or r.get('error')}", file=file)
        if "dp_sparse" in row and "release_seconds" in row["dp_sparse"]:
            print(f"{'':>10} release of pending noise: {row['dp_sparse']['release_seconds']:.3f} s", file=file)


if __name__ == "__main__":
    main()
