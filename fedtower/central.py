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
import torch

from fedtower.data.prepared import PreparedSplit, prepare_split
from fedtower.data.protocols import SplitSpec
from fedtower.data.schema import Dataset, atomic_write_text
from fedtower.data.weights import BehaviourWeights
from fedtower.metrics import SAMPLED_K, RankingSums, SampledSums, evaluate_scores
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
    split: SplitSpec | PreparedSplit | None = None,
    sampled_k: int = SAMPLED_K,
    out_dir: str | Path | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Split, train once, evaluate; returns (and optionally writes) a JSON-able result.

    `split` is a SplitSpec (default: the temporal protocol) or a split already made (e.g. a given one,
    `GivenSplit.prepare()`). Full-ranking metrics are always reported; where the split carries sampled
    negatives (leave-one-out, or a test file with negatives) the same model is also scored by HR@sampled_k /
    NDCG@sampled_k against them (`sampled`).
    """
    started = time.perf_counter()
    train_config = train_config or TrainConfig()
    model_settings = dict(model_settings or {})
    torch.manual_seed(train_config.seed)
    if not isinstance(split, PreparedSplit):
        split = prepare_split(dataset, weights, spec=split or SplitSpec(seed=train_config.seed))
    if not split.evaluable:
        raise ValueError("The split holds nothing out (split = none), so there is nothing to evaluate the "
                         "central model on; choose temporal, leave-one-out or a given test file.")  # fmt: skip
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
    popularity = popularity_baseline(split, k=k).finalize()
    result = {
        "dataset": dataset.name,
        "protocol": split.protocol,
        "users": len(split.users),
        "items": split.num_items,
        "train_interactions": int(split.train.items.size),
        "test_interactions": int(split.test.items.size),
        "model": model.config.to_dict(),
        "train": train_config.to_dict(),
        "epochs": logs,
        "metrics": metrics,
        "popularity": popularity,
    }
    if split.sampled is not None and len(split.sampled):
        result["sampled"] = {
            **evaluate_sampled(model, split.train, split.sampled, k=sampled_k,
                               history_len=train_config.history_len).finalize(),  # fmt: skip
            "negatives_from": split.sampled.source,
        }
        result["popularity_sampled"] = popularity_sampled(split, k=sampled_k).finalize()
    result["seconds"] = time.perf_counter() - started
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_text(out / "results.json", json.dumps(result, indent=2))
        torch.save(model.state_dict(), out / "model.pt")
        dataset.catalogue.index.save(out / "item_index.json")
    return result


def popularity_sampled(split: PreparedSplit, *, k: int = SAMPLED_K) -> SampledSums:
    """The popularity baseline under the split's sampled negatives (ties rank the positive last)."""
    popularity = split.popularity().astype(np.float64)
    sampled = split.sampled
    return SampledSums.of(popularity[sampled.positives], popularity[sampled.negatives], k=k)
