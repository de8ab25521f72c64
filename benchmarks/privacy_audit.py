"""Empirical privacy audit: a lower bound on epsilon from one training run, next to the epsilon claimed.

    python benchmarks/privacy_audit.py                       # user + interaction unit, honest eps 1/4/8, broken runs
    python benchmarks/privacy_audit.py --units user --epsilon 4
    python benchmarks/privacy_audit.py --client-level        # also canary clients under client-level DP

Steinke, Nasr and Jagielski 2023 ("Privacy Auditing with One (1) Training Run"),
with canaries for a recommender (fedtower/privacy/empirical_audit.py): 500
canaries, each with an item of its own, in with probability 1/2; the auditor
scores each from the released item towers (its item's bias) and guesses the
50 highest "in" and the 50 lowest "out". The bound holds at 95% confidence.
Broken runs use the site's test-only hooks: the DP noise times 0.1, and
clipping off; their ledgers name the hook and claim what an honest run would.
Prints a table and one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time

import numpy as np


def site_runs(args) -> list[dict]:
    from fedtower.simulations.audit_run import AuditConfig, run_audit

    runs = []
    for unit in args.units:
        plans = [("honest", {"target_epsilon": e}) for e in args.epsilon]
        plans += [("noise x0.1", {"target_epsilon": args.broken_epsilon, "noise_scale": 0.1}),
                  ("no clipping", {"target_epsilon": args.broken_epsilon, "no_clipping": True})]  # fmt: skip
        for kind, over in plans:
            result = run_audit(AuditConfig(unit=unit, canaries=args.canaries, guesses_per_side=args.k, **over))
            row = {"unit": unit, "run": kind, **result.to_dict()}
            row.pop("config")
            runs.append(row)
            print(f"{unit:<12} {kind:<12} claimed eps {row['claimed_epsilon']:6.3f}  lower bound "
                  f"{row['lower_bound']:6.3f}  ({row['correct']}/{row['guesses']} correct, {row['seconds']:.0f}s)",
                  file=sys.stderr)  # fmt: skip
    return runs


def client_level_runs(args) -> list[dict]:
    """Canary clients (one canary user each) among one-user clients, under Flower's client-level DP."""
    from fedtower.client.local import run_dataset
    from fedtower.config import RunSettings
    from fedtower.data.synthetic import SyntheticConfig, generate, to_folder
    from fedtower.privacy.empirical_audit import add_canaries, bias_scores, guess_and_bound
    from fedtower.server.federation import initial_item_tower
    from fedtower.server.run_dir import RunDirectory
    from fedtower.simulations.runner import simulate

    runs = []
    for noise in args.client_noise:
        started = time.perf_counter()
        root = tempfile.mkdtemp(prefix="fedtower-audit-client-")
        base = generate(SyntheticConfig(num_users=args.client_users, num_items=200, seed=0))
        canaries = add_canaries(base, args.client_canaries, "client")
        to_folder(canaries.dataset, f"{root}/data")
        settings = RunSettings(data=f"{root}/data", partitioning="users", num_server_rounds=args.client_rounds,
                               client_dp="server-side", client_dp_noise=noise, client_dp_clip=1.0, dim=16,
                               local_epochs=1, eval_every=args.client_rounds, fraction_evaluate=0.0,
                               output_dir=root, run_name="client-audit", history_len=30)  # fmt: skip
        result = simulate(settings)
        final = RunDirectory(result["run_dir"], create=False).load_latest_checkpoint()
        initial = {k: v.numpy() for k, v in initial_item_tower(settings).items()}
        scores = bias_scores(initial, final.arrays, run_dataset(settings).catalogue, canaries.items)
        claimed = [row["epsilon-client-dp"] for row in result["history"] if row["phase"] == "train"][-1]
        clients = canaries.dataset.events["user"].nunique()
        delta = 1.0 / (10 * clients)
        guesses = guess_and_bound(scores, canaries.included, k=args.client_k, delta=delta)
        row = {"unit": "client", "run": f"honest (noise {noise:g})", "claimed_epsilon": claimed, "delta": delta,
               "lower_bound": guesses.lower_bound, "guesses": guesses.guesses, "correct": guesses.correct,
               "canaries_in": int(canaries.included.sum()), "clients": clients,
               "seconds": time.perf_counter() - started}  # fmt: skip
        runs.append(row)
        print(f"{'client':<12} noise {noise:<6g} claimed eps {claimed:6.3f}  lower bound {guesses.lower_bound:6.3f}  "
              f"({guesses.correct}/{guesses.guesses} correct, {row['seconds']:.0f}s)", file=sys.stderr)  # fmt: skip
    return runs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", nargs="+", default=["user", "interaction"], choices=("user", "interaction"))
    parser.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 4.0, 8.0], help="honest runs' targets")
    parser.add_argument("--broken-epsilon", type=float, default=1.0, help="what the broken runs claim")
    parser.add_argument("--canaries", type=int, default=500)
    parser.add_argument("--k", type=int, default=50, help="guesses per side")
    parser.add_argument("--client-level", action="store_true", help="also audit client-level DP (Ray; slower)")
    parser.add_argument("--client-noise", type=float, nargs="+", default=[0.5, 2.0])
    parser.add_argument("--client-users", type=int, default=60)
    parser.add_argument("--client-canaries", type=int, default=200)
    parser.add_argument("--client-k", type=int, default=25)
    parser.add_argument("--client-rounds", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    logging.getLogger("fedtower").setLevel(logging.ERROR)
    runs = site_runs(args)
    if args.client_level:
        runs += client_level_runs(args)
    honest_ok = all(r["lower_bound"] <= r["claimed_epsilon"] for r in runs if r["run"].startswith("honest"))
    caught = all(r["lower_bound"] > r["claimed_epsilon"] for r in runs if not r["run"].startswith("honest"))
    result = {"benchmark": "privacy_audit", "confidence": 0.95, "runs": runs,
              "honest_within_claim": honest_ok, "broken_runs_caught": caught,
              "max_lower_bound_to_claim_honest": float(np.max([r["lower_bound"] / r["claimed_epsilon"] for r in runs
                                                               if r["run"].startswith("honest")]))}  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
