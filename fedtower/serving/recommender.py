"""Serving on the client: recommendations from the node's own state, nothing sent anywhere.

A Recommender holds the latest global item tower (as an item table), the
node's private user embeddings and each user's own history. Everything it
answers is computed locally: scores, explanations, re-ranking, bundles, cold
start and real-time updates of one user's embedding.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedtower.client.events import EventLog
from fedtower.client.local import build_model, load_node_data
from fedtower.client.state import ClientStateStore, StateError
from fedtower.config import RunSettings
from fedtower.data.schema import EVENT_COLUMNS, Catalogue
from fedtower.data.validation import validate_events
from fedtower.data.weights import BehaviourWeights
from fedtower.models.two_tower import ItemTower
from fedtower.serving.pooling import refit_free, user_vector
from fedtower.serving.rerank import cap_categories, mmr, unit_rows
from fedtower.serving.scoring import ItemTable, top_k
from fedtower.serving.types import (
    Contribution,
    Filters,
    Recommendation,
    ServingConfig,
    UnknownItemError,
    UnknownUserError,
)

log = logging.getLogger("fedtower.serving")

ID_EMBEDDING_KEY = "item_tower.id_embedding.weight"


@dataclass
class RecordResult:
    """What record() did: the event as logged, whether it counts as an interaction, how long it took."""

    user: str
    item: str
    behaviour: str
    timestamp: int
    value: float | None
    counted: bool  # False: logged, but too weak to be an interaction (e.g. a short dwell)
    weight: float
    milliseconds: float  # all of it: validation, the fsync'd log append, the update, the atomic save
    update_milliseconds: float  # the embedding update alone (in memory)

    def to_dict(self) -> dict:
        return asdict(self)


class Recommender:
    """Recommendations for this node's users, from its own state (see `from_state_dir`)."""

    def __init__(
        self,
        *,
        catalogue: Catalogue,
        item_vectors: np.ndarray,
        item_bias: np.ndarray,
        users: Sequence[str],
        free: np.ndarray,
        histories: Mapping[str, Sequence[int]],
        history_weights: Mapping[str, Sequence[float]] | None = None,
        config: ServingConfig | None = None,
        content_tower: ItemTower | None = None,
        store: ClientStateStore | None = None,
        event_log: EventLog | None = None,
    ):
        self.config = config or ServingConfig()
        self.catalogue = catalogue
        if item_vectors.shape[0] != len(catalogue):
            raise ValueError(
                f"The item table has {item_vectors.shape[0]} rows but the catalogue {len(catalogue)} items."
            )
        self.table = ItemTable(item_vectors, item_bias, self.config.precision)
        self.users = [str(u) for u in users]
        self._user_row = {u: row for row, u in enumerate(self.users)}
        self.free = np.array(free, dtype=np.float32).reshape(len(self.users), self.table.dim)
        self._history = [np.asarray(histories.get(u, ()), dtype=np.int64) for u in self.users]
        weights = history_weights or {}
        self._weights = [
            np.asarray(weights[u], dtype=np.float32) if u in weights else np.ones(len(h), np.float32)
            for u, h in zip(self.users, self._history, strict=True)
        ]
        self.content_tower = content_tower
        self.store, self.event_log = store, event_log
        self.titles = catalogue.items["title"].fillna("").astype(str).tolist()
        self.categories = [tuple(c) if isinstance(c, (tuple, list)) else () for c in catalogue.items["categories"]]
        self.prices = pd.to_numeric(catalogue.items["price"], errors="coerce").to_numpy(np.float64)
        self._category_masks: dict[str, np.ndarray] = {}
        self._prior: np.ndarray | None = None  # site prior for cold start, computed on first use
        self.behaviour_weights = BehaviourWeights()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_state_dir(
        cls,
        state_dir: str | Path,
        *,
        run_config: dict | None = None,
        node_config: dict | None = None,
        precision: str = "fp32",
        store: ClientStateStore | None = None,
    ) -> Recommender:
        """Load the latest global item tower, the private user state and the node's data.

        run_config / node_config default to what the node saved in its meta at
        its last round (the run config, and `data-path` or `partition-id` /
        `num-partitions`); given values override them.
        """
        state_dir = Path(state_dir).expanduser()
        if store is None:
            store = ClientStateStore.for_node(state_dir, node_config)
        saved = store.load_many(["item_tower", "users", "meta"], default=None)
        snapshot, users_state, meta = saved["item_tower"], saved["users"], saved["meta"] or {}
        if snapshot is None:
            raise StateError(
                f"State dir {state_dir} has no item-tower snapshot yet; the node must take part in at "
                "least one round before it can serve."
            )
        serving = meta.get("serving", {}) if isinstance(meta, dict) else {}
        settings = _settings(serving.get("run_config", {}), run_config or {})
        node = {**serving.get("node_config", {}), **(node_config or {}), "state-dir": str(state_dir)}
        if "data-path" not in node and "partition-id" not in node:
            raise ValueError(
                f"Cannot tell where the node's data is: state dir {state_dir} has no serving settings in "
                "its meta and node_config names neither 'data-path' nor 'partition-id'."
            )
        dim = int(snapshot[ID_EMBEDDING_KEY].shape[1]) if ID_EMBEDDING_KEY in snapshot else settings.dim
        settings = replace(settings, dim=dim)  # the snapshot knows its own width
        data = load_node_data(settings, node)
        model = build_model(settings, data.catalogue, 0)
        model.load_item_tower(snapshot, source="The saved item tower",
                              hint="was it saved with another catalogue or run config?")
        with torch.no_grad():
            vectors, bias = model.item_table()
        users, free = _user_table(users_state, data.users, dim)
        histories, weights = {}, {}
        for row, user in enumerate(data.users):
            split = data.split
            histories[user] = np.concatenate([split.train.items_of(row), split.test.items_of(row)])
            weights[user] = np.concatenate([split.train.weights_of(row), split.test.weights_of(row)])
        interaction_dp = settings.dp_enabled and settings.privacy_unit == "interaction"
        config = ServingConfig(history_len=settings.history_len, recency=model.config.recency,
                               pooling=settings.pooling, pool_history=not interaction_dp,
                               precision=precision, user_l2=settings.user_l2)  # fmt: skip
        return cls(catalogue=data.catalogue, item_vectors=vectors.numpy(), item_bias=bias.numpy(),
                   users=users, free=free, histories=histories, history_weights=weights, config=config,
                   content_tower=model.item_tower if model.item_tower.content_mlp is not None else None,
                   store=store, event_log=EventLog(store))  # fmt: skip

    @classmethod
    def from_model(
        cls,
        model,
        catalogue: Catalogue,
        histories,
        *,
        config: ServingConfig | None = None,
    ) -> Recommender:
        """Serve a trained TwoTower in memory (benchmarks, notebooks): `histories` is a UserHistories."""
        with torch.no_grad():
            vectors, bias = model.item_table()
            embedding = model.user_tower.embedding
            free = (embedding.weight.detach().cpu().numpy() if embedding is not None
                    else np.zeros((len(histories), model.config.dim)))  # fmt: skip
        users = list(histories.users)
        config = config or ServingConfig(recency=model.config.recency, pooling=model.config.pooling)
        return cls(catalogue=catalogue, item_vectors=vectors.cpu().numpy(), item_bias=bias.cpu().numpy(),
                   users=users, free=free[: len(users)],
                   histories={u: histories.items_of(r) for r, u in enumerate(users)},
                   history_weights={u: histories.weights_of(r) for r, u in enumerate(users)}, config=config,
                   content_tower=model.item_tower if model.item_tower.content_mlp is not None else None)  # fmt: skip

    # ------------------------------------------------------------------ lookups

    def row_of_user(self, user: str) -> int:
        row = self._user_row.get(str(user))
        if row is None:
            raise UnknownUserError(f"Unknown user {user!r}: this node holds no state for that user.")
        return row

    def row_of_item(self, item: str, field: str = "item") -> int:
        if str(item) not in self.catalogue.index:
            raise UnknownItemError(f"Field '{field}': item {item!r} is not in the catalogue.")
        return self.catalogue.index.row(str(item))

    def history(self, user: str) -> list[str]:
        """The user's interactions on this node, oldest first, as item ids."""
        return [self.catalogue.index.ids[r] for r in self._history[self.row_of_user(user)]]

    def _recent(self, rows: np.ndarray) -> np.ndarray:
        if not self.config.pool_history:
            return rows[:0]
        return rows[-self.config.history_len :]

    def user_vector(self, user: str) -> np.ndarray:
        return self._vector(self._history[self.row_of_user(user)], self.free[self.row_of_user(user)])[0]

    def _vector(self, rows: np.ndarray, free: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user vector, pooled history rows, their pooling weights)."""
        recent = self._recent(rows)
        vector, weights = user_vector(self.table.vectors[recent], free, recency=self.config.recency,
                                      pooling=self.config.pooling)  # fmt: skip
        return vector, recent, weights

    # ------------------------------------------------------------------ recommend

    def recommend(
        self,
        user: str,
        k: int = 10,
        *,
        filters: Filters | None = None,
        explain: bool = False,
        diversity: float = 0.0,
        category_cap: int | None = None,
        novelty: float = 0.0,
    ) -> list[Recommendation]:
        """Top k of the whole catalogue for a known user, seen items excluded.

        diversity in [0, 1]: MMR weight (0 = plain ranking). category_cap: at
        most that many items per category. novelty >= 0: subtracts novelty x
        the item's released bias (its learned popularity) from the ranking
        score; 1 ranks by taste alone.
        """
        row = self.row_of_user(user)
        history = self._history[row]
        vector, _, _ = self._vector(history, self.free[row])
        rows, scores = self._rank(vector, history, k, filters, diversity, category_cap, novelty)
        explain_as = (history, self.free[row]) if explain else None
        return self._results(rows, scores, explain_as)

    def recommend_for_history(
        self,
        events: Sequence[str | Mapping],
        k: int = 10,
        *,
        filters: Filters | None = None,
        explain: bool = False,
        diversity: float = 0.0,
        category_cap: int | None = None,
        novelty: float = 0.0,
    ) -> list[Recommendation]:
        """Cold start: a new user's few events (item ids or event dicts, oldest first), pooled, no training."""
        rows = self._history_rows(events)
        free = np.zeros(self.table.dim, dtype=np.float32)
        vector, _, _ = self._vector(rows, free)
        if not self.config.pool_history:
            # A model trained without pooling has no user vector from history: use the items' mean.
            vector = self.table.vectors[rows].mean(axis=0) if len(rows) else free
        if self.config.cold_prior:
            # A few events are a noisy taste estimate: shrink it towards this site's typical user
            # (on ml-latest-small this beats pooling alone, and popularity from 3 events on).
            vector = self.site_prior() + len(rows) / (len(rows) + self.config.cold_shrink) * vector
        ranked, scores = self._rank(vector, rows, k, filters, diversity, category_cap, novelty)
        return self._results(ranked, scores, (rows, free) if explain else None)

    def site_prior(self) -> np.ndarray:
        """Mean user vector of this node's users with a history (computed locally, never sent)."""
        if self._prior is None:
            known = [row for row in range(len(self.users)) if len(self._history[row])]
            vectors = [self._vector(self._history[row], self.free[row])[0] for row in known]
            self._prior = np.mean(vectors, axis=0) if vectors else np.zeros(self.table.dim, np.float32)
        return self._prior

    def _history_rows(self, events: Sequence[str | Mapping]) -> np.ndarray:
        if isinstance(events, (str, bytes)):
            raise ValueError("Field 'events' must be a list of item ids or events, not one string.")
        rows: list[int] = []
        for position, event in enumerate(events):
            item = event.get("item") if isinstance(event, Mapping) else event
            row = self.row_of_item(str(item), field=f"events[{position}].item")
            if row not in rows:  # one interaction per item, at its first time
                rows.append(row)
        return np.asarray(rows, dtype=np.int64)

    def _rank(self, vector, exclude_rows, k, filters, diversity, category_cap, novelty):
        k = _check_k(k)
        if not (isinstance(novelty, (int, float)) and math.isfinite(novelty) and novelty >= 0):
            raise ValueError(f"novelty must be a non-negative number, got {novelty!r}.")
        if not (isinstance(diversity, (int, float)) and 0.0 <= diversity <= 1.0):
            raise ValueError(f"diversity must be between 0 and 1, got {diversity!r}.")
        if category_cap is not None and (not isinstance(category_cap, int) or category_cap < 1):
            raise ValueError(f"category_cap must be a positive integer, got {category_cap!r}.")
        # One catalogue-sized array, modified in place: at 10^6 items every extra pass costs ~1 ms.
        ranking = self.table.scores(vector)
        if novelty:
            ranking -= novelty * self.table.bias
        ranking[exclude_rows] = -np.inf
        if filters is not None and filters.active:
            ranking[~self.filter_mask(filters)] = -np.inf
        if diversity == 0 and category_cap is None:
            rows = top_k(ranking, k)
        else:
            pool = max(self.config.rerank_pool, 10 * k)
            rows = self._rerank(ranking, pool, k, diversity, category_cap)
            if len(rows) < k and category_cap is not None and pool < len(ranking):
                # The cap emptied the pool: search the whole catalogue (plain order, or a wider MMR pool).
                wider = len(ranking) if diversity == 0 else min(len(ranking), 5 * pool)
                rows = self._rerank(ranking, wider, k, diversity, category_cap)
        return rows, ranking[rows] + novelty * self.table.bias[rows]  # the model's scores of the picks

    def _rerank(self, ranking, pool, k, diversity, category_cap) -> np.ndarray:
        candidates = top_k(ranking, pool)
        ordered = candidates
        if diversity > 0:
            unit = unit_rows(self.table.vectors[candidates])
            picks = len(candidates) if category_cap is not None else k
            ordered = mmr(candidates, ranking[candidates], unit, picks, diversity)
        if category_cap is not None:
            return cap_categories(ordered, self.categories, category_cap, k)
        return ordered[:k]

    def filter_mask(self, filters: Filters) -> np.ndarray:
        """Items the filters allow (bool [N])."""
        keep = np.ones(len(self.catalogue), dtype=bool)
        if filters.categories is not None:
            keep &= np.logical_or.reduce([self._category_mask(c) for c in filters.categories]
                                         or [np.zeros_like(keep)])  # fmt: skip
        if filters.min_price is not None or filters.max_price is not None:
            price = self.prices
            known = np.isfinite(price)
            if not known.any():
                raise ValueError("Filter 'price' cannot be applied: this catalogue has no prices.")
            low = -np.inf if filters.min_price is None else filters.min_price
            high = np.inf if filters.max_price is None else filters.max_price
            keep &= known & (np.nan_to_num(price) >= low) & (np.nan_to_num(price) <= high)
        if filters.available is not None:
            allowed = np.zeros_like(keep)
            rows = [self.row_of_item(i, field="available") for i in filters.available]
            allowed[rows] = True
            keep &= allowed
        return keep

    def _category_mask(self, category: str) -> np.ndarray:
        mask = self._category_masks.get(category)
        if mask is None:
            mask = np.fromiter((category in cats for cats in self.categories), dtype=bool,
                               count=len(self.categories))  # fmt: skip
            if not mask.any():
                raise ValueError(f"Filter 'categories': no catalogue item is in category {category!r}.")
            self._category_masks[category] = mask
        return mask

    def _results(self, rows: np.ndarray, scores: np.ndarray, explain_as) -> list[Recommendation]:
        """`scores[i]` is the model's score of `rows[i]`."""
        results = []
        for row, score in zip(rows, scores, strict=True):
            explanation = []
            if explain_as is not None:
                explanation = self._contributions(explain_as[0], explain_as[1], int(row), top=3)
            results.append(Recommendation(
                item=self.catalogue.index.ids[row], title=self.titles[row], score=float(score),
                categories=list(self.categories[row]), explanation=explanation))  # fmt: skip
        return results

    # ------------------------------------------------------------------ explain

    def explain(self, user: str, item: str, top: int = 3) -> list[Contribution]:
        """The history items that contributed most to `item`'s score for `user`, largest first."""
        row = self.row_of_user(user)
        if not isinstance(top, int) or top < 1:
            raise ValueError(f"top must be a positive integer, got {top!r}.")
        return self._contributions(self._history[row], self.free[row], self.row_of_item(item), top)

    def _contributions(self, history: np.ndarray, free: np.ndarray, item_row: int, top: int) -> list[Contribution]:
        target = self.table.vectors[item_row]
        _, recent, weights = self._vector(history, free)
        method = "pooling"
        if len(recent) == 0:  # no pooling (interaction-level DP): nearest history items instead
            recent, weights, method = history[-self.config.history_len :], None, "similarity"
        if len(recent) == 0:
            return []
        vectors = self.table.vectors[recent]
        cosine = unit_rows(vectors) @ (target / max(float(np.linalg.norm(target)), 1e-12))
        if weights is None:
            shares, weights = cosine, np.zeros(len(recent), dtype=np.float32)
        else:
            shares = weights * (vectors @ target)
        # An item appears once in a history, so rows are distinct; ties go to the newer item.
        order = np.lexsort((-np.arange(len(recent)), -shares))[:top]
        return [Contribution(item=self.catalogue.index.ids[recent[j]], title=self.titles[recent[j]],
                             contribution=float(shares[j]), weight=float(weights[j]),
                             similarity=float(cosine[j]), method=method) for j in order]  # fmt: skip

    # ------------------------------------------------------------------ bundles

    def complete(self, user: str, basket: Sequence[str], k: int = 5, *,
                 allow_same_category: bool = False) -> list[Recommendation]:  # fmt: skip
        """k items that go with `basket` for this user.

        Scored against user vector + mean basket vector (complements in the
        shared space, personalised). Never proposes a basket item or a seen
        item, nor (unless allow_same_category) an item sharing a category with
        the basket.
        """
        row = self.row_of_user(user)
        if isinstance(basket, (str, bytes)) or len(basket) == 0:
            raise ValueError("Field 'basket' must be a non-empty list of item ids.")
        basket_rows = np.asarray([self.row_of_item(i, field=f"basket[{n}]") for n, i in enumerate(basket)])
        vector, _, _ = self._vector(self._history[row], self.free[row])
        query = vector + self.table.vectors[basket_rows].mean(axis=0)
        ranking = self.table.scores(query)
        ranking[self._history[row]] = -np.inf
        ranking[basket_rows] = -np.inf
        if not allow_same_category:
            basket_categories = {c for r in basket_rows for c in self.categories[r]}
            for category in basket_categories:
                ranking[self._category_mask(category)] = -np.inf
        rows = top_k(ranking, _check_k(k))
        return self._results(rows, ranking[rows], None)

    # ------------------------------------------------------------------ new items

    def embed_new_items(self, features: np.ndarray) -> np.ndarray:
        """Vectors for items not in the id table, from their content features alone."""
        if self.content_tower is None:
            raise ValueError("This model has no content tower (the catalogue has no content features).")
        with torch.no_grad():
            return self.content_tower.content_vectors(torch.as_tensor(features)).numpy()

    # ------------------------------------------------------------------ real time

    def record(self, event: Mapping) -> RecordResult:
        """Log one event of a known user and update that user's embedding now (item tower frozen).

        The event is appended (fsync'd) to the state dir's event log, which the
        next round's training reads; the user's history takes the item, a few
        gradient steps move the user's free vector, and the embeddings are saved
        atomically into the state.
        """
        started = time.perf_counter()
        clean = self._validated_event(event)
        row = self.row_of_user(clean["user"])
        item_row = self.catalogue.index.row(clean["item"])
        if self.event_log is not None:
            self.event_log.append(clean)
        frame = pd.DataFrame([clean])
        counted, weight = (x[0] for x in self.behaviour_weights.label_and_weight(frame))
        update_started = time.perf_counter()
        if counted:
            self._add_interaction(row, item_row, float(weight))
            self._refit(row)
            self._prior = None  # the site prior moves with its users
        update_ms = 1e3 * (time.perf_counter() - update_started)
        if counted:
            if self.store is not None:
                users = {"users": list(self.users), "embeddings": torch.from_numpy(self.free.copy())}
                self.store.save({"users": users})  # atomic: a new generation, then the manifest
        return RecordResult(**{k: clean[k] for k in EVENT_COLUMNS}, counted=bool(counted),
                            weight=float(weight), milliseconds=1e3 * (time.perf_counter() - started),
                            update_milliseconds=update_ms)  # fmt: skip

    def _validated_event(self, event: Mapping) -> dict:
        if not isinstance(event, Mapping):
            raise ValueError(f"An event must be a mapping with fields {list(EVENT_COLUMNS)}, not "
                             f"{type(event).__name__}.")  # fmt: skip
        unknown = sorted(set(event) - set(EVENT_COLUMNS))
        if unknown:
            raise ValueError(f"Event field {unknown[0]!r} is not known; events have {list(EVENT_COLUMNS)}.")
        for name in ("user", "item", "behaviour"):
            if not isinstance(event.get(name), str) or not event.get(name).strip():
                raise ValueError(f"Event field '{name}' is required and must be a non-empty string.")
        self.row_of_user(event["user"])
        self.row_of_item(event["item"])
        timestamp = event.get("timestamp")
        if timestamp is None:
            timestamp = int(time.time())
        if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float, str)):
            raise ValueError(f"Event field 'timestamp' must be seconds since the epoch, got {timestamp!r}.")
        value = event.get("value")
        raw = {"user": event["user"], "item": event["item"], "behaviour": event["behaviour"],
               "timestamp": str(timestamp), "value": "" if value is None else str(value)}  # fmt: skip
        # The loaders' own checks (behaviour, time, value ranges): the same rules as the data files.
        # The item was checked above: catalogue=None spares an O(catalogue) membership test.
        clean, _ = validate_events(pd.DataFrame([raw]), source="event", first_line=1, catalogue=None)
        value = clean["value"].iloc[0]
        return {"user": str(event["user"]), "item": str(event["item"]), "behaviour": str(event["behaviour"]),
                "timestamp": int(clean["timestamp"].iloc[0]),
                "value": None if pd.isna(value) else float(value)}  # fmt: skip

    def _add_interaction(self, row: int, item_row: int, weight: float) -> None:
        """One interaction per item (as training builds them): a repeat keeps its place, strongest weight.

        A new item goes last (the newest): record() serves events as they happen. An event
        back-dated behind the history is placed by its time at the next load.
        """
        history, weights = self._history[row], self._weights[row]
        where = np.flatnonzero(history == item_row)
        if where.size:
            weights[where[0]] = max(weights[where[0]], weight)
        else:
            self._history[row] = np.append(history, item_row)
            self._weights[row] = np.append(weights, np.float32(weight))

    def _refit(self, row: int) -> None:
        history = self._history[row]
        vector, _, _ = self._vector(history, self.free[row])
        pooled = vector - self.free[row]
        self.free[row] = refit_free(self.free[row], pooled, self.table.vectors, self.table.bias, history,
                                    self._weights[row], steps=self.config.update_steps,
                                    lr=self.config.update_lr, l2=self.config.user_l2,
                                    sample=self.config.update_sample, seed=len(history))  # fmt: skip


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    return int(k)


def _settings(saved: dict, given: dict) -> RunSettings:
    """Saved run config (keys this version knows) overridden by the given one."""
    known = set(RunSettings().to_run_config())
    merged = {k: v for k, v in dict(saved).items() if k in known}
    merged.update(given)
    merged["resume"] = False
    return RunSettings.from_run_config(merged)


def _user_table(saved: dict | None, data_users: list[str], dim: int) -> tuple[list[str], np.ndarray]:
    """The saved users (in saved order) plus any user of the node's data not saved yet (zero vector)."""
    users = list(saved["users"]) if saved else []
    table = saved["embeddings"].float().numpy() if saved else np.zeros((0, dim), np.float32)
    if table.shape[1] != dim:
        raise ValueError(f"Saved user embeddings have dim {table.shape[1]}, the item tower {dim}.")
    known = set(users)
    extra = [u for u in data_users if u not in known]
    if extra:
        table = np.vstack([table, np.zeros((len(extra), dim), np.float32)])
    return users + extra, table
