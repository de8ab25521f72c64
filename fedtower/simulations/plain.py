"""The same federated training as the Flower apps, as a plain Python loop.

No Flower, no Ray, no state files: each round every sampled site loads the
global item tower, trains its local epochs with the same TrainConfig as the
ClientApp, and the towers are averaged by example count (FedAvg), with
FedAdam's step on top when the strategy is fedadam. Used as the
reference for the simulation-overhead benchmark and for quick tuning.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from fedtower.client.handlers import local_optimizer, local_train_config, reconstruct_users
from fedtower.client.local import build_model, partition_config, run_dataset, run_split
from fedtower.config import RunSettings
from fedtower.data.partition import partition_users
from fedtower.metrics import RankingSums
from fedtower.models.training import evaluate, private_optimizer_state, train


def plain_federation(
    settings: RunSettings,
    *,
    num_partitions: int,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """FedAvg over `num_partitions` sites for settings.num_server_rounds rounds, in process."""
    dataset = run_dataset(settings)
    catalogue = dataset.catalogue
    config = partition_config(settings, num_partitions)
    # The clients' own splits: the whole dataset's, cut to each partition's users (as load_node_data does).
    whole = run_split(settings)
    assignment = partition_users(dataset, config)
    splits = [whole.subset(assignment.get(p, [])) for p in range(num_partitions)]
    torch.manual_seed(settings.seed)
    global_state = build_model(settings, catalogue, 0).item_tower_state()
    users = {p: None for p in range(num_partitions)}
    optimizers: dict[int, dict] = {}
    rng = np.random.default_rng(settings.seed)
    moments: dict[str, dict] = {"m": {}, "v": {}}
    logs = []
    for server_round in range(1, settings.num_server_rounds + 1):
        started = time.perf_counter()
        count = max(settings.min_train_nodes, int(num_partitions * settings.fraction_train))
        sampled = sorted(rng.choice(num_partitions, size=min(count, num_partitions), replace=False))
        states, weights = [], []
        for p in sampled:
            split = splits[p]
            model = build_model(settings, catalogue, len(split.users))
            model.load_state_dict(global_state, strict=False)
            if users[p] is not None:
                model.user_tower.embedding.weight.data.copy_(users[p])
            train_config = local_train_config(settings, server_round)
            reconstruct_users(model, split.train, train_config, settings.reconstruction_epochs,
                              settings.reconstruction_lr)
            optimizer = local_optimizer(model, train_config, settings)
            if p in optimizers:
                optimizer.load_state_dict(optimizers[p])
            train(model, split.train, train_config, optimizer=optimizer)
            optimizers[p] = private_optimizer_state(optimizer, item_tower=settings.keep_item_moments)
            users[p] = model.user_tower.embedding.weight.detach().clone()
            states.append(model.item_tower_state())
            weights.append(len(split.users))
        total = float(sum(weights))
        mean = {key: sum(state[key] * (w / total) for state, w in zip(states, weights, strict=True))
                for key in global_state}  # fmt: skip
        global_state = server_step(settings, server_round, global_state, mean, moments)
        log = {"round": server_round, "seconds": time.perf_counter() - started}
        if server_round % settings.eval_every == 0 or server_round == settings.num_server_rounds:
            log.update(_evaluate_all(settings, catalogue, splits, global_state, users))
        logs.append(log)
        if progress is not None:
            progress(log)
    return {"rounds": logs, "final": logs[-1]}


def server_step(settings: RunSettings, server_round: int, current: dict, mean: dict, moments: dict) -> dict:
    """FedAvg takes the mean; FedAdam steps from it with Flower's formula (its bias correction included)."""
    if settings.strategy == "fedavg":
        return mean
    if settings.strategy != "fedadam":
        raise ValueError(f"The plain loop runs fedavg and fedadam, not {settings.strategy!r}.")
    b1, b2, eta = settings.server_beta_1, settings.server_beta_2, settings.server_lr
    eta_norm = eta * np.sqrt(1 - b2 ** (server_round + 1.0)) / (1 - b1 ** (server_round + 1.0))
    stepped = {}
    for key, value in current.items():
        delta = mean[key] - value
        m = moments["m"][key] = b1 * moments["m"].get(key, torch.zeros_like(delta)) + (1 - b1) * delta
        v = moments["v"][key] = b2 * moments["v"].get(key, torch.zeros_like(delta)) + (1 - b2) * delta**2
        stepped[key] = value + eta_norm * m / (v.sqrt() + settings.server_tau)
    return stepped


def _evaluate_all(settings, catalogue, splits, global_state, users) -> dict:
    sums = RankingSums()
    for p, split in enumerate(splits):
        model = build_model(settings, catalogue, len(split.users))
        model.load_state_dict(global_state, strict=False)
        if users[p] is not None:
            model.user_tower.embedding.weight.data.copy_(users[p])
        sums = sums + evaluate(model, split.train, split.test, k=settings.k, history_len=settings.history_len)
    return sums.finalize()
