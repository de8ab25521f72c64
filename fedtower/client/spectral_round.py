"""A site's side of the spectral DP item tower (run config dp-mechanism = "spectral").

Three rounds, told apart by the train config key `spectral-release`; in each
the site releases one sum over its users with Gaussian noise from its secure
source and charges it to its accountant (fedtower.privacy.spectral):

1. "histogram": every catalogue item (the release is dense: an item nobody
   here touched gets noise like any other).
2. "cooccurrence": the head items the coordinator chose from the noisy
   histogram sum (`spectral-head`, public post-processing).
3. "selection": the tower built from the first two (the round's arrays) and
   the candidate weightings (`spectral-candidates`): for each, the sum of the
   users' NDCG@k on their own latest training items.

User unit: the first two releases use each user's training items without the
latest share the selection scores (`selection_split`), so the selection is not
scored on items the tower was built from. Interaction unit: they use every
training item (moving one event across that boundary would change two of the
user's items, doubling the sensitivity).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtower.client.local import spectral_layout
from fedtower.client.node_settings import NodeSettings
from fedtower.client.private_round import plan_spectral
from fedtower.config import RunSettings
from fedtower.data.prepared import UserHistories
from fedtower.metrics import ndcg_at_k, rank_top_k
from fedtower.models.two_tower import pad_histories
from fedtower.privacy.ledger import signed_to_config_record
from fedtower.privacy.spectral import (
    HEAD_MAX,
    RELEASES,
    SpectralLayout,
    reweighted,
    selection_split,
    sensitivity,
    user_cooccurrence,
    user_histogram,
)

log = logging.getLogger("fedtower.client")

RELEASE_KEY = "spectral-release"
HEAD_KEY = "spectral-head"
CANDIDATES_KEY = "spectral-candidates"
VECTOR_KEY = "spectral"
NOISE_STD_KEY = "spectral-noise-std"
MAX_CANDIDATES = 8
ID_KEY, BIAS_KEY = "item_tower.id_embedding.weight", "item_tower.bias.weight"


def spectral_train(message: Message, context: Context, settings: RunSettings, node: NodeSettings, state) -> Message:
    # Imported here: handlers imports this module.
    from fedtower.client.handlers import _next_meta, _PrivateRound, commit_refusal, open_round, private_train_content

    config: ConfigRecord = message.content["config"]
    release = str(config.get(RELEASE_KEY, ""))
    if release not in RELEASES:
        raise ValueError(f"A spectral round needs config {RELEASE_KEY!r} in {list(RELEASES)}, got {release!r}.")
    server_round = int(config.get("server-round", 0))
    with state.round_lock(node.train_lock_timeout):
        data, model, global_snapshot, meta = open_round(message, settings, node, state)
        round_ = _PrivateRound(settings, node, state, data, context, server_round, meta)
        plan = plan_spectral(round_.calibration, round_.accountant, round_.count, round_.cap, release)
        if plan.exhausted:
            record = commit_refusal(round_, plan, message, server_round, data, global_snapshot,
                                    what=f"the {release} release")  # fmt: skip
            return Message(content=private_train_content(message.content["arrays"], record, exhausted=True),
                           reply_to=message)  # fmt: skip
        layout = spectral_layout(settings, data.catalogue)
        vector, bound = site_statistic(release, settings, data.split.train, model, layout, config,
                                       message.content["arrays"])  # fmt: skip
        std = plan.own[0] * bound * (node.test_only_noise_scale or 1.0)
        noise = round_.randomness.spawn(f"spectral-{release}").standard_normal(vector.size, dtype=torch.float64)
        noisy = vector + std * noise.numpy()
        entry = round_.entry(plan, status="trained", added=plan.added, mechanism="gaussian", max_grad_norm=bound,
                             release="item-statistics")  # fmt: skip
        meta = _next_meta(round_.meta, message, server_round, data.source)
        components = {"item_tower": global_snapshot, "meta": meta}
        record = round_.commit(components, plan.added, entry)
    # The noise std is public: it follows from the site's calibration (in its ledger) and the release.
    metrics = MetricRecord({"num-examples": 1, "budget-exhausted": 0, NOISE_STD_KEY: float(std)})
    return Message(content=RecordDict({"arrays": ArrayRecord({VECTOR_KEY: Array(noisy)}), "metrics": metrics,
                                       "ledger": signed_to_config_record(record)}), reply_to=message)  # fmt: skip


def site_statistic(release: str, settings: RunSettings, train: UserHistories, model, layout: SpectralLayout,
                   config: ConfigRecord, arrays: ArrayRecord) -> tuple[np.ndarray, float]:  # fmt: skip
    """The site's sum for `release` before noise, and its L2 sensitivity."""
    unit = settings.privacy_unit
    num_items = model.config.num_items
    if release == "histogram":
        return user_histogram(statistics_histories(train, unit), num_items, unit), sensitivity(release, unit)
    if release == "cooccurrence":
        head = checked_head(config.get(HEAD_KEY), num_items)
        return user_cooccurrence(statistics_histories(train, unit), head, unit), sensitivity(release, unit)
    candidates = checked_candidates(config.get(CANDIDATES_KEY))
    sums = selection_sums(model, layout, train, candidates, arrays, k=settings.k, history_len=settings.history_len)
    return sums, sensitivity(release, unit, num_candidates=len(candidates))


def statistics_histories(train: UserHistories, unit: str) -> UserHistories:
    if unit != "user":
        return train
    kept, _ = selection_split(train)
    return histories_from_lists(train.users, kept)


def histories_from_lists(users: list[str], lists: list[np.ndarray]) -> UserHistories:
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(items) for items in lists], out=indptr[1:])
    items = np.concatenate(lists).astype(np.int64) if lists else np.zeros(0, dtype=np.int64)
    return UserHistories(list(users), indptr, items, np.ones(len(items), dtype=np.float32))


def selection_sums(model, layout: SpectralLayout, train: UserHistories, candidates: list[tuple[float, float, float]],
                   arrays: ArrayRecord, *, k: int, history_len: int) -> np.ndarray:  # fmt: skip
    """For each candidate weighting: the sum over users of NDCG@k on their own held-out latest items."""
    return selection_per_user(model, layout, train, candidates, arrays, k=k, history_len=history_len).sum(0)


def selection_per_user(model, layout: SpectralLayout, train: UserHistories,
                       candidates: list[tuple[float, float, float]], arrays: ArrayRecord, *, k: int,
                       history_len: int, chunk: int = 256) -> np.ndarray:  # fmt: skip
    """users x K: each user's NDCG@k on their own latest SELECTION_HOLDOUT share of training items, ranking the
    catalogue without their other training items, under each candidate weighting of the tower in `arrays`.
    Every value lies in [0, 1]; a user with nothing held out has 0 everywhere."""
    table, bias = arrays[ID_KEY].numpy(), arrays[BIAS_KEY].numpy()
    kept, held = selection_split(train)
    values = np.zeros((len(train), len(candidates)))
    for index, weights in enumerate(candidates):
        weighted_table, weighted_bias = reweighted(layout, table, bias, weights)
        vectors, item_bias = torch.from_numpy(weighted_table), torch.from_numpy(weighted_bias).squeeze(-1)
        for start in range(0, len(train), chunk):
            rows = range(start, min(start + chunk, len(train)))
            history = pad_histories([kept[u] for u in rows], history_len)
            with torch.no_grad():  # the tower alone: no private user rows
                scores = (model.user_vectors(None, history, vectors) @ vectors.T + item_bias).numpy()
            ranked = rank_top_k(scores, [kept[u] for u in rows], k)
            for offset, u in enumerate(rows):
                if len(held[u]):
                    values[u, index] = ndcg_at_k(ranked[offset][ranked[offset] >= 0], held[u], k)
    return values


def checked_head(value, num_items: int) -> np.ndarray:
    if value is None:
        raise ValueError(f"A co-occurrence release needs the head items in config {HEAD_KEY!r}.")
    head = np.asarray(list(value), dtype=np.int64)
    if head.size == 0 or head.size > HEAD_MAX:
        raise ValueError(f"The head must hold 1 to {HEAD_MAX} items, got {head.size}.")
    if head.min() < 0 or head.max() >= num_items or len(np.unique(head)) != head.size:
        raise ValueError(f"The head must be distinct item rows in [0, {num_items}).")
    return head


def checked_candidates(value) -> list[tuple[float, float, float]]:
    flat = [float(v) for v in (value or [])]
    if not flat or len(flat) % 3 or len(flat) // 3 > MAX_CANDIDATES:
        raise ValueError(f"A selection release needs 1 to {MAX_CANDIDATES} (spectral, content, prior) weightings "
                         f"in config {CANDIDATES_KEY!r}, got {len(flat)} numbers.")  # fmt: skip
    if not all(math.isfinite(v) and v >= 0 for v in flat):
        raise ValueError("Candidate weights must be finite and non-negative.")
    return [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)]
