"""Cross-device quality under client-level DP against its non-private twin, measured in one run.

    python benchmarks/quality_client_dp.py --preset synthetic-cross-device --epsilon 8
    python benchmarks/quality_client_dp.py --preset synthetic-cross-device --epsilon 2 4 8 \\
        --run-config "num-server-rounds=5"

One user per client. Runs the federation (Flower's simulation engine) from a preset without DP, then
with client-level DP at each target epsilon, at delta = 1 / (10 N) for N clients unless `--delta` says
otherwise. `--mode poisson` (the default): secret Poisson sampling at rate fraction-train, noise calibrated
with fedtower's RDP accountant (amplification by sampling); `server-side` / `client-side`: Flower's
wrappers over a fixed sample, calibrated with Flower's accountant (no amplification). Same data, model,
strategy and rounds. Prints a table and one JSON object as the last line: the twin's and popularity's
NDCG@20 and, per epsilon, ndcg@20, recall@20, ratio to the twin, the noise multiplier and the epsilon the
run's accountant reports spent.

Evaluation: once, after the last round, by the preset's fraction-evaluate of the clients (a random share,
drawn per run: at 5,000 users the NDCG@20 standard error is about 0.002). The simulated clients opt in
to exact evaluation sums (node config allow-raw-evaluation), as whoever runs a simulation holds every
client's data; deployed clients under client-level DP withhold it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time

from fedtower.central import popularity_baseline
from fedtower.client.local import run_split
from fedtower.config import RunSettings
from fedtower.privacy.accounting import noise_multiplier_for
from fedtower.server.federation import evaluation_protocol
from fedtower.server.report import plot_privacy_curve
from fedtower.simulations.presets import load_preset, parse_overrides
from fedtower.simulations.runner import simulate
from fedtower.strategies.client_dp import calibrated_noise_multiplier
from fedtower.tables import render_table

SITES = {"allow-raw-evaluation": True, "allow-plaintext-state": True}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="synthetic-cross-device", help="preset name or run-config TOML")
    parser.add_argument("--data", default=None, help="dataset (default: the preset's)")
    parser.add_argument("--run-config", default="", help="run-config overrides on top of the preset")
    parser.add_argument("--epsilon", type=float, nargs="+", default=[8.0])
    parser.add_argument("--delta", type=float, default=0.0, help="0: 1 / (10 N)")
    parser.add_argument("--mode", choices=("poisson", "server-side", "client-side"), default="poisson",
                        help="poisson: secret Poisson sampling at rate fraction-train, accounted with amplification "
                             "(fedtower's accountant); server-side / client-side: Flower's wrappers over a fixed "
                             "sample, no amplification")  # fmt: skip
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--plot", default=None, help="PNG of quality against epsilon (default: in --out)")
    return parser.parse_args(argv)


def base_run_config(args) -> dict:
    values = {**load_preset(args.preset), **parse_overrides(args.run_config)}
    if args.data:
        values["data"] = args.data
    if values.get("partitioning") != "users":
        raise ValueError("quality_client_dp.py measures one user per client: the preset must have "
                         "partitioning = \"users\".")  # fmt: skip
    # One evaluation, after the last round, of the preset's share of the clients (fraction-evaluate).
    values["eval-every"] = int(values.get("num-server-rounds", 10))
    return values


def federated(base: dict, name: str, out: str, **extra) -> dict:
    settings = RunSettings.from_run_config({**base, **extra, "output-dir": out, "run-name": name})
    started = time.perf_counter()
    result = simulate(settings, site_config=SITES)
    evaluations = [row for row in result["history"] if row["phase"] == "evaluate"]
    trained = [row for row in result["history"] if row["phase"] == "train"]
    spent = [row["epsilon-client-dp"] for row in trained if row.get("epsilon-client-dp") is not None]
    return {"ndcg@20": evaluations[-1]["ndcg@20"], "recall@20": evaluations[-1]["recall@20"],
            "coverage@20": evaluations[-1].get("coverage@20", float("nan")),
            "epsilon_spent": spent[-1] if spent else 0.0, "rounds_completed": len(trained),
            "seconds": time.perf_counter() - started,
            "seconds_per_round": (time.perf_counter() - started) / max(len(trained), 1)}  # fmt: skip


def noise_for(mode: str, epsilon: float, delta: float, settings: RunSettings, population: int, sampled: int) -> float:
    """The client-dp-noise that makes the planned rounds spend `epsilon` at `delta`."""
    if mode == "poisson":  # one sampled Gaussian step per round at rate fraction-train (fedtower's accountant)
        return noise_multiplier_for(target_epsilon=epsilon, target_delta=delta, sample_rate=settings.fraction_train,
                                    steps=settings.num_server_rounds)  # fmt: skip
    accounted = calibrated_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                            rounds=settings.num_server_rounds, population_size=population,
                                            num_sampled_clients=sampled)  # fmt: skip
    # The run's noise is relative to the clip; a fixed sample of part of the population is accounted at twice
    # the clip (fedtower.strategies.client_dp), so it needs twice the multiplier.
    return accounted * (1.0 if sampled == population else 2.0)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    out = args.out or tempfile.mkdtemp(prefix="fedtower-client-dp-")
    base = base_run_config(args)
    settings = RunSettings.from_run_config(base)
    # The clients' own split (the run config's: temporal unless --run-config names another).
    split = run_split(settings)
    population = len(split.users)
    sampled = max(int(population * settings.fraction_train), settings.min_train_nodes)  # expected, under poisson
    delta = args.delta or 1.0 / (10 * population)
    popularity = popularity_baseline(split).finalize()["ndcg@20"]
    print(f"{population} one-user clients, {sampled} a round, {settings.num_server_rounds} rounds; "
          f"popularity ndcg@20 {popularity:.4f}", file=sys.stderr)  # fmt: skip
    twin = federated(base, "non-private", out)
    print(f"non-private twin: ndcg@20 {twin['ndcg@20']:.4f} ({twin['seconds']:.0f} s)", file=sys.stderr)
    curve = []
    for epsilon in args.epsilon:
        noise = noise_for(args.mode, epsilon, delta, settings, population, sampled)
        point = federated(base, f"eps-{epsilon:g}", out, **{"client-dp": args.mode, "client-dp-noise": noise,
                                                             "target-delta": delta})  # fmt: skip
        point.update({"target_epsilon": epsilon, "noise_multiplier": noise, "delta": delta,
                      "ratio": point["ndcg@20"] / twin["ndcg@20"],
                      "over_popularity": point["ndcg@20"] / popularity})  # fmt: skip
        curve.append(point)
        print(f"epsilon {epsilon:g}: ndcg@20 {point['ndcg@20']:.4f}, {point['ratio']:.3f} of the twin, "
              f"spent {point['epsilon_spent']:.3f} ({point['seconds']:.0f} s)", file=sys.stderr)  # fmt: skip
    rows = [["popularity", f"{popularity:.4f}", "", "", ""],
            ["non-private", f"{twin['ndcg@20']:.4f}", "1.000", "", ""]]
    rows += [[f"epsilon {p['target_epsilon']:g}", f"{p['ndcg@20']:.4f}", f"{p['ratio']:.3f}",
              f"{p['epsilon_spent']:.3f}", f"{p['noise_multiplier']:.3f}"] for p in curve]  # fmt: skip
    print(render_table(["run", "ndcg@20", "of twin", "epsilon spent", "noise"], rows,
                       "Cross-device, client-level DP"), file=sys.stderr)  # fmt: skip
    plot = plot_privacy_curve(curve, args.plot or f"{out}/client_dp_curve.png", references={
        "popularity, same split": {"ndcg@20": popularity},
        "non-private federation": {k: twin[k] for k in ("ndcg@20", "recall@20")}})  # fmt: skip
    result = {"preset": args.preset, "mode": args.mode, "data": settings.data, "clients": population,
              "sampled_per_round": sampled,
              "rounds": settings.num_server_rounds, "strategy": settings.strategy, "delta": delta,
              "popularity_ndcg@20": popularity, "non_private": twin, "curve": curve, "plot": str(plot),
              "out": out}  # fmt: skip
    if len(curve) == 1:
        result.update({k: curve[0][k] for k in ("ndcg@20", "ratio", "epsilon_spent")})
    result["protocol"] = evaluation_protocol(settings)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
