"""Centralised, non-private reference training: the quality ceiling.

Every federated or private run is compared with this on the same data and
settings. `run_central` is what `fedtower train-central` and the benchmark call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedtower.data.prepared import PreparedSplit, UserHistories, prepare_split
from fedtower.data.schema import Dataset, atomic_write_text
from fedtower.data.splits import leave_one_out
from fedtower.data.weights import BehaviourWeights
from fedtower.metrics import RankingSums, evaluate_scores
from fedtower.models.training import TrainConfig, evaluate, evaluate_sampled, train
from fedtower.models.two_tower import TwoTower, TwoTowerConfig


def build_model(dataset: Dataset, split: PreparedSplit, **model_settings) -> TwoTower:
    """A two-tower model sized for this catalogue and these users, content features included."""
    features = dataset.catalogue.features
    config = TwoTowerConfig(
        num_items=split.num_items,
        num_users=len(split.users),
        content_dim=0 if features is None else features.shape[1],
        **model_settings,
    )
    content = None if features is None else torch.from_numpy(features)
    return TwoTower(config, content)


def popularity_baseline(split: PreparedSplit, *, k: int = 20) -> RankingSums:
    """Rank every item by training popularity (the floor any model must beat)."""
    popularity = split.popularity()
    scores = np.broadcast_to(popularity.astype(np.float64), (len(split.users), split.num_items))
    return evaluate_scores(
        scores,
        exclude=split.train.as_lists(),
        relevant=split.test.as_lists(),
        k=k,
        popularity=popularity,
        num_popularity_users=int((split.train.lengths() > 0).sum()),
    )


def run_central(
    dataset: Dataset,
    *,
    model_settings: dict | None = None,
    train_config: TrainConfig | None = None,
    weights: BehaviourWeights | None = None,
    k: int = 20,
    out_dir: str | Path | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Split, train, evaluate; returns (and optionally writes) a JSON-able result."""
    started = time.perf_counter()
    train_config = train_config or TrainConfig()
    model_settings = dict(model_settings or {})
    torch.manual_seed(train_config.seed)
    split = prepare_split(dataset, weights)
    model = build_model(dataset, split, **model_settings)
    logs = train(model, split.train, train_config, progress=progress)
    metrics = evaluate(
        model,
        split.train,
        split.test,
        k=k,
        history_len=train_config.history_len,
        popularity=split.popularity(),
    ).finalize()
    result = {
        "dataset": dataset.name,
        "users": len(split.users),
        "items": split.num_items,
        "train_interactions": int(split.train.items.size),
        "test_interactions": int(split.test.items.size),
        "model": model.config.to_dict(),
        "train": train_config.to_dict(),
        "epochs": logs,
        "metrics": metrics,
        "popularity": popularity_baseline(split, k=k).finalize(),
        "seconds": time.perf_counter() - started,
    }
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_text(out / "results.json", json.dumps(result, indent=2))
        torch.save(model.state_dict(), out / "model.pt")
        dataset.catalogue.index.save(out / "item_index.json")
    return result


def run_leave_one_out(
    dataset: Dataset,
    *,
    model_settings: dict | None = None,
    train_config: TrainConfig | None = None,
    weights: BehaviourWeights | None = None,
    num_negatives: int = 99,
    k: int = 10,
) -> dict:
    """HR@k / NDCG@k under the NCF protocol (latest item held out, 99 sampled negatives).

    For comparison with published tables only; the fixed temporal protocol is
    the one fedtower's own figures use.
    """
    train_config = train_config or TrainConfig()
    torch.manual_seed(train_config.seed)
    weights = weights or BehaviourWeights()
    interactions = weights.to_interactions(dataset.events, dataset.catalogue.index)
    split = leave_one_out(interactions, num_negatives=num_negatives, seed=train_config.seed,
                          num_items=len(dataset.catalogue))  # fmt: skip
    users = sorted(interactions["user"].astype(str).unique())
    train_histories = UserHistories.from_interactions(split.train, users)
    position = pd.Index(users).get_indexer(split.test_items.index.astype(str))
    test_items = np.full(len(users), -1, dtype=np.int64)
    test_items[position] = split.test_items.to_numpy()
    negatives = np.zeros((len(users), num_negatives), dtype=np.int64)
    negatives[position] = split.negatives
    holder = PreparedSplit(len(dataset.catalogue), train_histories, train_histories)
    model = build_model(dataset, holder, **dict(model_settings or {}))
    train(model, train_histories, train_config)
    return evaluate_sampled(model, train_histories, test_items, negatives, k=k,
                            history_len=train_config.history_len)  # fmt: skip
