"""The server side of a fedtower run: catalogue, initial item tower, strategy, outputs.

`server_app.py` only calls `run_federation`. The server knows the public
catalogue and nothing else: it builds the item tower from it, starts the
wrapped Flower strategy, checkpoints every round and writes the run report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

from fedtower.central import popularity_baseline, popularity_sampled
from fedtower.client.local import build_model, run_dataset, run_split, spectral_layout
from fedtower.config import RunSettings
from fedtower.privacy.ledger import (
    LedgerMonitor,
    ServerLedger,
    entry_dicts,
    entry_of,
    epsilon_table,
    ledger_line_of,
    plot_epsilon,
)
from fedtower.privacy.spectral import content_block
from fedtower.server.report import plot_metrics, reference_table, summary_table
from fedtower.server.run_dir import RunDirectory
from fedtower.strategies.client_dp import (
    SERVER_OPTIMIZERS_OVER_DP,
    accountant_state,
    client_dp_epsilon,
    optimizer_over_dp_mean,
    restore_accountant_state,
    wrap_client_level_dp,
)
from fedtower.strategies.item_tower import (
    FederationFinished,
    ItemTowerStrategy,
    array_spec,
    arrays_digest,
    build_inner_strategy,
    restore_strategy_state,
    strategy_arguments,
    strategy_state,
)
from fedtower.strategies.poisson_client_dp import PoissonClientDP
from fedtower.strategies.secure_dp import SecureDPStep
from fedtower.strategies.spectral import SecureSpectralTower, SpectralBuilder, SpectralItemTower

log = logging.getLogger("fedtower.server")

SUMMARY_KEYS = ("ndcg@{k}", "recall@{k}", "precision@{k}", "mrr", "coverage@{k}", "users")
# A DP run's evaluation is noisy sums: each mean with its noise level (coverage is not released).
DP_SUMMARY_KEYS = ("ndcg@{k}", "ndcg@{k}-noise", "recall@{k}", "recall@{k}-noise", "precision@{k}", "mrr",
                   "users", "dp-noise-std")  # fmt: skip


SAMPLED_SUMMARY_KEYS = ("sampled-hr@{sampled_k}", "sampled-ndcg@{sampled_k}")


def evaluation_protocol(settings: RunSettings) -> str:
    """What the run's evaluation figures mean (a node's own split or test-path may differ: its node config)."""
    if settings.split == "given":
        return f"given: train {settings.train_data}, test {settings.test_data}"
    return settings.split_spec().describe()


def initial_item_tower(settings: RunSettings) -> ArrayRecord:
    """The item tower every client starts from, built from the public catalogue alone."""
    torch.manual_seed(settings.seed)
    catalogue = run_dataset(settings).catalogue
    model = build_model(settings, catalogue, num_users=0)
    return ArrayRecord(model.item_tower_state())


def _numpy_arrays(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in arrays.items()}


def _array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def client_level_dp(grid: Grid, settings: RunSettings, expected_arrays: dict):
    """The client-level DP mean of the round's updates: secret Poisson sampling (`poisson`), or Flower's
    wrapper around FedAvg over a fixed sample (Flower's sample size: the connected nodes times
    fraction-train, at least min-train-nodes). With FedAdam or FedYogi as the strategy, the server
    optimizer steps from that noisy mean (post-processing)."""
    population = client_population(grid, settings)
    delta = client_level_delta(settings, population)
    if settings.client_dp == "poisson":
        mean = PoissonClientDP(
            sample_rate=settings.fraction_train, noise_multiplier=settings.client_dp_noise,
            clipping_norm=settings.client_dp_clip, population_size=population, target_delta=delta,
            expected_arrays=expected_arrays, max_epsilon=settings.max_epsilon or None,
            fraction_evaluate=settings.fraction_evaluate, min_evaluate_nodes=settings.min_evaluate_nodes,
            min_available_nodes=settings.min_available_nodes, min_train_nodes=settings.min_train_nodes,
        )  # fmt: skip
    else:
        mean = wrap_client_level_dp(
            build_inner_strategy("fedavg", **asdict(settings)),
            mode=settings.client_dp,
            noise_multiplier=settings.client_dp_noise,
            clipping_norm=settings.client_dp_clip,
            num_sampled_clients=max(int(population * settings.fraction_train), settings.min_train_nodes),
            target_delta=delta,
            population_size=population,
            max_epsilon=settings.max_epsilon or None,
        )
    if settings.strategy in SERVER_OPTIMIZERS_OVER_DP:
        return optimizer_over_dp_mean(settings.strategy, mean,
                                      **strategy_arguments(settings.strategy, **asdict(settings)))  # fmt: skip
    return mean  # the config allows only fedavg besides the two


def secure_dp_step(settings: RunSettings) -> SecureDPStep:
    """The federation-wide DP step under secure aggregation (run config secure-aggregation = true)."""
    return SecureDPStep(threshold=settings.secagg_threshold, l2_units=settings.secagg_scale,
                        max_grad_norm=settings.max_grad_norm, expected_batch=float(settings.dp_batch_size),
                        table_lr=settings.dp_table_lr, lr=settings.lr, stage_timeout=settings.round_timeout,
                        min_available_nodes=settings.min_available_nodes, min_train_nodes=settings.min_train_nodes,
                        fraction_evaluate=settings.fraction_evaluate,
                        min_evaluate_nodes=settings.min_evaluate_nodes)  # fmt: skip


def spectral_item_tower(settings: RunSettings) -> SpectralItemTower:
    """The spectral DP item tower (run config dp-mechanism = "spectral"), from the public catalogue."""
    catalogue = run_dataset(settings).catalogue
    builder = SpectralBuilder(layout=spectral_layout(settings, catalogue),
                              num_items=len(catalogue), content=content_block(catalogue.features, len(catalogue)))
    if settings.secure_aggregation:
        return SecureSpectralTower(builder=builder, l2_units=settings.secagg_scale,
                                   threshold=settings.secagg_threshold, stage_timeout=settings.round_timeout,
                                   min_available_nodes=settings.min_available_nodes,
                                   min_train_nodes=settings.min_train_nodes,
                                   fraction_evaluate=settings.fraction_evaluate,
                                   min_evaluate_nodes=settings.min_evaluate_nodes)  # fmt: skip
    return SpectralItemTower(builder=builder,
                             min_train_nodes=settings.min_train_nodes, min_available_nodes=settings.min_available_nodes,
                             fraction_evaluate=settings.fraction_evaluate,
                             min_evaluate_nodes=settings.min_evaluate_nodes)  # fmt: skip


def secure_summary(strategy: SecureDPStep) -> str:
    """Mode, threshold, aborted rounds and the noise each site added, for the run summary."""
    lines = ["Privacy mode: federation-wide user-level DP under secure aggregation (Skellam noise shares)",
             f"  threshold t = {strategy.last_threshold or strategy.threshold} sites in every unmasked sum; "
             f"{strategy.steps_taken} DP step(s) taken; {len(strategy.aborted)} round(s) aborted"]  # fmt: skip
    lines += [f"  round {r} aborted: {why}" for r, why in strategy.aborted]
    noise = strategy.noise_table()
    if noise:
        lines += ["Noise share each site added (std of its Skellam noise per coordinate):", noise]
    return "\n".join(lines)


def same_split_references(settings: RunSettings) -> dict[str, dict[str, float]]:
    """Popularity (most popular first over every user's training items) on the run's own split, when the
    server holds the run's events: a simulation, whose data is the union of the sites'. A deployed server
    holds the public catalogue only, and gets nothing here. Non-private: a reference, never released."""
    try:
        dataset = run_dataset(settings)
        if dataset.events is None or len(dataset.events) == 0:
            return {}
        split = run_split(settings)
    except (OSError, ValueError) as err:
        log.info("No popularity reference: %s", err)
        return {}
    if not split.evaluable:
        return {}
    metrics = popularity_baseline(split, k=settings.k).finalize()
    keys = (f"ndcg@{settings.k}", f"recall@{settings.k}", f"precision@{settings.k}", "mrr")
    reference = {key: float(metrics[key]) for key in keys}
    if split.sampled is not None and len(split.sampled):
        reference |= {key: float(value) for key, value in popularity_sampled(split, k=settings.sampled_k).finalize()
                      .items() if key.startswith("sampled-")}  # fmt: skip
    return {"popularity": reference}


def client_population(grid: Grid, settings: RunSettings) -> int:
    return max(settings.min_available_nodes, len(list(grid.get_node_ids())))


def client_level_delta(settings: RunSettings, population: int) -> float:
    return settings.target_delta or 1.0 / (10 * population)


def restore_client_dp_accountant(strategy, extra: dict, *, round_: int, where) -> None:
    """Continue the client-level DP accountant of a resumed run; fail closed when the checkpoint lacks it."""
    if "client_dp_accountant" not in extra:
        # A fresh accountant would report epsilon from 0 for rounds that were already released.
        raise ValueError(
            f"The checkpoint of round {round_} in {where} has no client-level DP accountant, so resuming would "
            "restart epsilon at 0 for a run that has already released rounds. Start a new run name instead."
        )
    restore_accountant_state(strategy, extra["client_dp_accountant"])


def wait_for_nodes(grid: Grid, count: int, *, timeout: float, poll: float = 1.0) -> None:
    """Wait until `count` nodes are connected. Flower's strategies wait too, but only after sizing their
    sample from the nodes connected at that moment."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Only {connected} of the {count} nodes (min-available-nodes) connected within "
                               f"{timeout:.0f} s (round-timeout).")  # fmt: skip
        log.info("Waiting for nodes: %d of %d connected.", connected, count)
        time.sleep(poll)


SIMULATION_PULL_INTERVAL = 0.01  # seconds between the simulation grid's polls for replies


def poll_replies_promptly(grid: Grid) -> None:
    """Flower's in-memory grid (simulation) sleeps 0.1 s between polls for replies, a quarter of a
    10-site round; polling its in-process state every 10 ms costs next to nothing."""
    if getattr(grid, "pull_interval", 0) > SIMULATION_PULL_INTERVAL:
        grid.pull_interval = SIMULATION_PULL_INTERVAL


def named_run(settings: RunSettings) -> RunSettings:
    """The settings with a run name: the one given, else the start time."""
    if settings.run_name:
        return settings
    return RunSettings(**{**asdict(settings), "run_name": time.strftime("run-%Y%m%d-%H%M%S")})


def run_federation(grid: Grid, settings: RunSettings, *, wait_for: int | None = None) -> dict:
    """Run (or resume) the federation; returns the final metrics history."""
    started = time.perf_counter()
    poll_replies_promptly(grid)
    settings = named_run(settings)
    run_dir = RunDirectory(settings.run_dir)
    run_dir.write_config(settings.to_run_config())
    log.info("Run directory: %s", run_dir.path)
    log.info("Evaluation: %s", evaluation_protocol(settings))

    # A simulation waits for every virtual node before round 1 (`wait_for`), without raising the strategy's
    # min-available-nodes: that would end the run as soon as one node had spent its budget.
    wait_for_nodes(grid, max(settings.min_available_nodes, wait_for or 0), timeout=settings.round_timeout)
    arrays = initial_item_tower(settings)
    expected = array_spec(arrays)
    inner = build_inner_strategy(settings.strategy, **asdict(settings))
    optimizer_strategy = inner  # holds the server-optimizer state worth checkpointing
    if settings.client_dp != "off":
        inner = client_level_dp(grid, settings, expected)
        if settings.strategy in SERVER_OPTIMIZERS_OVER_DP:
            optimizer_strategy = inner  # its moments are the state to checkpoint
    if settings.secure_aggregation:
        inner = optimizer_strategy = secure_dp_step(settings)
    if settings.spectral:
        inner = optimizer_strategy = spectral_item_tower(settings)
    offset = 0
    monitor = LedgerMonitor()  # each node's last accepted privacy history, to refuse one that went back
    checkpoint = run_dir.load_latest_checkpoint() if settings.resume else None
    if checkpoint is not None:
        offset = checkpoint.round
        arrays = _array_record(checkpoint.arrays)
        if array_spec(arrays) != expected:
            raise ValueError(
                f"The checkpoint of round {offset} in {run_dir.path} does not match this run's item "
                "tower (different catalogue or dim); start a new run name instead of resuming."
            )
        restore_strategy_state(optimizer_strategy, checkpoint.strategy_state)
        if settings.secure_aggregation:
            inner.steps_taken = int(checkpoint.extra.get("secure_steps", offset))
        if settings.client_dp != "off":
            restore_client_dp_accountant(inner, checkpoint.extra, round_=offset, where=run_dir.path)
        monitor.load_state_dict(checkpoint.extra.get("ledger_monitor") or {"nodes": {}})
        log.info("Resuming %s after round %d (item tower %s).", settings.run_name, offset,
                 arrays_digest(arrays))  # fmt: skip
    elif settings.resume:
        log.info("No checkpoint in %s; starting from round 1.", run_dir.path)

    def on_round_end(current: int, arrays: ArrayRecord, metrics: dict) -> None:
        extra = {"strategy": settings.strategy, "digest": arrays_digest(arrays), "ledger_monitor": monitor.state_dict()}
        if settings.secure_aggregation:
            extra["secure_steps"] = inner.steps_taken
        if settings.client_dp != "off":
            extra["client_dp_accountant"] = accountant_state(inner)
            metrics = {**metrics, "epsilon-client-dp": client_dp_epsilon(inner)}
            log.info("Round %d: client-level DP epsilon %.3f (delta %.1e).", current,
                     metrics["epsilon-client-dp"], client_dp_delta)  # fmt: skip
        run_dir.record_round(current, "train", metrics)
        loss = metrics.get("train-loss")
        log.info("Round %d/%d trained in %.1f s%s.", current, settings.num_server_rounds, metrics["round-seconds"],
                 f", train loss {loss:.4g}" if isinstance(loss, (int, float)) else "")  # fmt: skip
        run_dir.save_checkpoint(current, _numpy_arrays(arrays), strategy_state(optimizer_strategy), extra)

    ledger = ServerLedger(run_dir.path / "privacy_ledger.jsonl")
    client_dp_delta = client_level_delta(settings, client_population(grid, settings))

    def on_ledger(current: int, node_id: int, record) -> str | None:
        """Keep the entry; refuse the reply of a node whose privacy history went back."""
        try:
            line = ledger_line_of(record)
            entry = entry_of(line)
        except ValueError as err:
            return f"its ledger entry is unreadable: {err}"
        ledger.append(line)  # as it arrived (signed): the node released it, so it belongs in the ledger
        problem = monitor.problem(node_id, entry)
        if problem is not None:
            return problem
        monitor.accept(node_id, entry)
        if entry.is_test_only:
            log.warning("Round %d: node %s used a TEST-ONLY DP seed: its release is not private.", current,
                        entry.node)  # fmt: skip
        log.info("Round %d: node %s (%s-level DP) epsilon %.3f -> %.3f (delta %.1e), %s.", current,
                 entry.node, entry.unit, entry.epsilon_before, entry.epsilon_after, entry.delta,
                 entry.status)  # fmt: skip
        return None

    def on_evaluate(current: int, metrics: dict) -> None:
        run_dir.record_round(current, "evaluate", metrics)
        log.info("Round %d: %s", current, "  ".join(
            f"{k} {metrics[k]:.4f}" for k in (f"ndcg@{settings.k}", f"recall@{settings.k}") if k in metrics
        ))  # fmt: skip

    strategy = ItemTowerStrategy(
        inner,
        expected_arrays=expected,
        num_rounds=settings.num_server_rounds,
        eval_every=settings.eval_every,
        round_offset=offset,
        seed=settings.seed,
        on_round_end=on_round_end,
        on_evaluate=on_evaluate,
        on_ledger=on_ledger,
        update_codec=settings.update_compression,
    )
    remaining = settings.num_server_rounds - offset
    if remaining > 0:
        try:
            strategy.start(
                grid=grid,
                initial_arrays=arrays,
                num_rounds=remaining,
                timeout=settings.round_timeout,
                train_config=ConfigRecord({"run-name": settings.run_name}),
                evaluate_config=ConfigRecord({"run-name": settings.run_name}),
            )
        except (FederationFinished, PrivacyBudgetExhausted) as reason:
            log.warning("The run ends early: %s", reason)
    history = run_dir.history()
    references = same_split_references(settings)
    plot_metrics(history, run_dir.plots_dir, phases=("train", "evaluate"), references=references)
    keys = [key.format(k=settings.k) for key in (DP_SUMMARY_KEYS if settings.dp_enabled else SUMMARY_KEYS)]
    sampled_keys = [key.format(sampled_k=settings.sampled_k) for key in SAMPLED_SUMMARY_KEYS]
    keys += [key for key in sampled_keys if any(key in row for row in history)]
    table = f"Evaluation: {evaluation_protocol(settings)}\n" + summary_table(history, keys=keys)
    compared = reference_table(history, references, [f"ndcg@{settings.k}", f"recall@{settings.k}",
                                                     *(key for key in sampled_keys if key in keys)])
    if compared:
        table += "\n\n" + compared
    entries = ledger.entries()
    if entries:
        plot_epsilon(entries, run_dir.plot_path("epsilon"))
        table += "\n\nPrivacy (final epsilon per client; see privacy_ledger.jsonl)\n" + epsilon_table(entries)
    if settings.spectral:
        table += "\n\n" + inner.report()
    if settings.secure_aggregation and settings.spectral:
        table += ("\n\nPrivacy mode: federation-wide user-level DP under secure aggregation (Skellam noise shares; "
                  "the coordinator sees only sums of at least t sites)")  # fmt: skip
    elif settings.secure_aggregation:
        table += "\n\n" + secure_summary(inner)
    elif settings.dp_enabled and settings.client_dp == "off":
        table += ("\n\nPrivacy mode: per-site DP (each site adds the full noise to its own update; "
                  "the coordinator sees each update)")  # fmt: skip
    run_dir.write_summary(table)
    log.info("Finished %s in %.1fs.\n%s", settings.run_name, time.perf_counter() - started, table)
    return {"run_dir": str(run_dir.path), "history": history, "rejected": strategy.rejected, "references": references,
            "ledger": entry_dicts(entries), "exhausted": sorted(strategy.exhausted)}  # fmt: skip
