"""Serving on the client: recommendations from the node's own state, nothing sent anywhere.

A Recommender holds the latest global item tower (as an item table), the
node's private user embeddings and each user's own history. Everything it
answers is computed locally: scores, explanations, re-ranking, bundles, cold
start and real-time updates of one user's embedding.

Loaded from a state dir, it also follows that state while the node trains
(`refresh`, see fedtower.serving.sync): a newer item-tower snapshot is swapped
in whole, newer user rows are taken in. It is not thread-safe: the HTTP server
calls it from one thread, and builds what it swaps in off to the side.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fedtower.client.events import EventLog
from fedtower.client.local import load_node_data, model_config
from fedtower.client.state import ClientStateStore, StateError
from fedtower.config import RunSettings
from fedtower.data.schema import Catalogue
from fedtower.data.weights import BehaviourWeights
from fedtower.models.two_tower import ItemTower
from fedtower.serving.items import LOCAL_ITEMS, ServedItems, embed, parse_new_items, stored_local_items
from fedtower.serving.online import OnlineUpdates, RecordResult  # noqa: F401 - RecordResult: public here too
from fedtower.serving.pooling import user_vector
from fedtower.serving.rerank import cap_categories, mmr, unit_rows
from fedtower.serving.scoring import top_k
from fedtower.serving.sync import USERS, Refresh, StateSync, items_from_snapshot
from fedtower.serving.types import (
    Contribution,
    Filters,
    Recommendation,
    ServingConfig,
    TableOptions,
    UnknownItemError,
    UnknownUserError,
)

log = logging.getLogger("fedtower.serving")

ID_EMBEDDING_KEY = "item_tower.id_embedding.weight"


class Recommender(OnlineUpdates):
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
        new_users: Iterable[str] = (),
        items: ServedItems | None = None,
        sync: StateSync | None = None,
    ):
        """`new_users`: users without a trained embedding (served by pooling their history, like a cold
        start, until a round trains them). `items` / `sync`: set by from_state_dir."""
        self.config = config or ServingConfig()
        if item_vectors.shape[0] != len(catalogue):
            raise ValueError(
                f"The item table has {item_vectors.shape[0]} rows but the catalogue {len(catalogue)} items."
            )
        self._items = items or ServedItems.build(catalogue, item_vectors, item_bias, table=self.config.table_options,
                                                 content_tower=content_tower)  # fmt: skip
        self.users = [str(u) for u in users]
        self._user_row = {u: row for row, u in enumerate(self.users)}
        self.free = np.array(free, dtype=np.float32).reshape(len(self.users), self.table.dim)
        self._history = [np.asarray(histories.get(u, ()), dtype=np.int64) for u in self.users]
        weights = history_weights or {}
        self._weights = [
            np.asarray(weights[u], dtype=np.float32) if u in weights else np.ones(len(h), np.float32)
            for u, h in zip(self.users, self._history, strict=True)
        ]
        self._new_users = {str(u) for u in new_users}
        self._changed: set[str] = set()  # users whose rows record() changed since a training save came in
        self.store, self.event_log, self._sync = store, event_log, sync
        self._prior: np.ndarray | None = None  # site prior for cold start, computed on first use
        self._index_fallbacks = 0  # queries the index could not serve (too narrow filters): served exactly
        self.behaviour_weights = BehaviourWeights()

    # The item side is one object, swapped whole when a newer snapshot or a local item comes in.
    catalogue = property(lambda self: self._items.catalogue)
    table = property(lambda self: self._items.table)
    titles = property(lambda self: self._items.titles)
    categories = property(lambda self: self._items.categories)
    prices = property(lambda self: self._items.prices)
    content_tower = property(lambda self: self._items.content_tower)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_state_dir(
        cls,
        state_dir: str | Path,
        *,
        run_config: dict | None = None,
        node_config: dict | None = None,
        precision: str = "fp32",
        index: str = "auto",
        index_probes: int = 64,
        store: ClientStateStore | None = None,
    ) -> Recommender:
        """Load the latest global item tower, the private user state and the node's data.

        run_config / node_config default to what the node saved in its meta at
        its last round (the run config, and `data-path` or `partition-id` /
        `num-partitions`); given values override them. precision / index /
        index_probes: how the item table is held and searched (see TableOptions).
        """
        table = TableOptions(precision=precision, index=index, index_probes=index_probes)  # refused before any I/O
        state_dir = Path(state_dir).expanduser()
        if store is None:
            store = ClientStateStore.for_node(state_dir, node_config)
        saved, versions = store.load_versioned(["item_tower", USERS, "meta", LOCAL_ITEMS], default=None)
        snapshot, users_state, meta = saved["item_tower"], saved[USERS], saved["meta"] or {}
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
        items = items_from_snapshot(snapshot, settings, data.catalogue, stored_local_items(saved[LOCAL_ITEMS]),
                                    table, generation=versions["item_tower"],
                                    round=meta.get("last_round") if isinstance(meta, dict) else None)  # fmt: skip
        users, free, new_users = _user_table(users_state, data.users, dim)
        histories, weights = {}, {}
        for row, user in enumerate(data.users):
            split = data.split
            histories[user] = np.concatenate([split.train.items_of(row), split.test.items_of(row)])
            weights[user] = np.concatenate([split.train.weights_of(row), split.test.weights_of(row)])
        interaction_dp = settings.dp_enabled and settings.privacy_unit == "interaction" and not settings.spectral
        shape = model_config(settings, data.catalogue, 0)
        config = ServingConfig(history_len=settings.history_len, recency=shape.recency, user_blocks=shape.user_blocks,
                               pooling=settings.pooling, pool_history=not interaction_dp,
                               user_l2=settings.user_l2, **table.to_dict())  # fmt: skip
        sync = StateSync(store, settings, data.catalogue, table, versions)
        recommender = cls(catalogue=items.catalogue, item_vectors=items.table.vectors, item_bias=items.table.bias,
                          users=users, free=free, histories=histories, history_weights=weights, config=config,
                          store=store, event_log=EventLog(store), new_users=new_users, items=items,
                          sync=sync)  # fmt: skip
        recommender._replay_log()
        return recommender

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
        config = config or ServingConfig(recency=model.config.recency, pooling=model.config.pooling,
                                         user_blocks=model.config.user_blocks)
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
        return self._query(self.row_of_user(user))[0]

    def _query(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user vector, history rows, free vector) of a user: trained, or new (pooled like a cold start)."""
        history = self._history[row]
        if self.users[row] in self._new_users:
            free = np.zeros(self.table.dim, dtype=np.float32)
            return self._cold_vector(history), history, free
        return self._vector(history, self.free[row])[0], history, self.free[row]

    def _cold_vector(self, rows: np.ndarray) -> np.ndarray:
        """A user vector from a few events alone, no trained embedding."""
        free = np.zeros(self.table.dim, dtype=np.float32)
        vector, _, _ = self._vector(rows, free)
        if not self.config.pool_history:
            # A model trained without pooling has no user vector from history: use the items' mean.
            vector = self.table.vectors[rows].mean(axis=0) if len(rows) else free
        if self.config.cold_prior:
            # A few events are a noisy taste estimate: shrink it towards this site's typical user
            # (on ml-latest-small this beats pooling alone, and popularity from 3 events on).
            vector = self.site_prior() + len(rows) / (len(rows) + self.config.cold_shrink) * vector
        return vector

    def _vector(self, rows: np.ndarray, free: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user vector, pooled history rows, their pooling weights)."""
        recent = self._recent(rows)
        vector, weights = user_vector(self.table.vectors[recent], free, recency=self.config.recency,
                                      pooling=self.config.pooling, blocks=self.config.user_blocks)  # fmt: skip
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
        vector, history, free = self._query(self.row_of_user(user))
        rows, scores = self._rank(vector, history, k, filters, diversity, category_cap, novelty)
        return self._results(rows, scores, (history, free) if explain else None)

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
        vector = self._cold_vector(rows)
        ranked, scores = self._rank(vector, rows, k, filters, diversity, category_cap, novelty)
        return self._results(ranked, scores, (rows, np.zeros(self.table.dim, np.float32)) if explain else None)

    def site_prior(self) -> np.ndarray:
        """Mean user vector of this node's trained users with a history (computed locally, never sent)."""
        if self._prior is None:
            known = [row for row, user in enumerate(self.users)
                     if len(self._history[row]) and user not in self._new_users]  # fmt: skip
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
        plain = diversity == 0 and category_cap is None
        pool = k if plain else max(self.config.rerank_pool, 10 * k)
        found = self._index_candidates(vector, exclude_rows, filters, pool, novelty)
        if found is not None:
            rows, ranking = found  # the index's candidates that may be returned, scored exactly
            if plain:
                picked = rows[top_k(ranking, k)]
            else:
                picked = self._rerank(ranking, pool, k, diversity, category_cap, rows)
            if len(picked) == k or category_cap is None:
                return picked, self.table.scores_of(picked, vector)
            # The category cap emptied the candidates: the exact path below searches the whole catalogue.
        # One catalogue-sized array, modified in place: at 10^6 items every extra pass costs ~1 ms.
        ranking = self.table.scores(vector)
        if novelty:
            ranking -= novelty * self.table.bias
        ranking[exclude_rows] = -np.inf
        if filters is not None and filters.active:
            ranking[~self.filter_mask(filters)] = -np.inf
        if plain:
            rows = top_k(ranking, k)
        else:
            rows = self._rerank(ranking, pool, k, diversity, category_cap)
            if len(rows) < k and category_cap is not None and pool < len(ranking):
                # The cap emptied the pool: search the whole catalogue (plain order, or a wider MMR pool).
                wider = len(ranking) if diversity == 0 else min(len(ranking), 5 * pool)
                rows = self._rerank(ranking, wider, k, diversity, category_cap)
        return rows, ranking[rows] + novelty * self.table.bias[rows]  # the model's scores of the picks

    def _index_candidates(self, vector, exclude_rows, filters, need, novelty):
        """(rows, exact ranking scores) of the index's candidates that may be returned, at least `need` of
        them; None where there is no index or it cannot find enough (the caller then scores everything).

        Over-fetches by the excluded rows, then widens the search (4x the candidates, 2x the lists) until
        `need` survive the filters; a filter so narrow that a wide search still comes up short is served
        exactly rather than approximately.
        """
        index = self.table.index
        if index is None:
            return None
        active = filters is not None and filters.active
        fetch = max(need + len(exclude_rows), 2 * need, 64)
        probes = index.probes
        while True:
            rows = index.candidates(vector, 1.0 - novelty, fetch, probes=probes)
            keep = ~np.isin(rows, exclude_rows)
            if active:
                keep &= self.filter_mask(filters, rows)
            if keep.sum() >= need:
                rows = rows[keep]
                ranking = self.table.scores_of(rows, vector)
                if novelty:
                    ranking -= novelty * self.table.bias[rows]
                return rows, ranking
            if fetch * 8 >= index.num_items or probes >= index.lists:
                self._index_fallbacks += 1
                return None
            fetch, probes = 4 * fetch, min(2 * probes, index.lists)

    def _rerank(self, ranking, pool, k, diversity, category_cap, rows=None) -> np.ndarray:
        """Catalogue rows: MMR and / or the category cap over the `pool` best of `ranking`
        (`ranking[j]` scores row `rows[j]`, or row j where `rows` is None)."""
        candidates = top_k(ranking, pool)
        relevance = ranking[candidates]
        if rows is not None:
            candidates = rows[candidates]
        ordered = candidates
        if diversity > 0:
            unit = unit_rows(self.table.vectors[candidates])
            picks = len(candidates) if category_cap is not None else k
            ordered = mmr(candidates, relevance, unit, picks, diversity)
        if category_cap is not None:
            return cap_categories(ordered, self.categories, category_cap, k)
        return ordered[:k]

    def filter_mask(self, filters: Filters, rows: np.ndarray | None = None) -> np.ndarray:
        """Which items the filters allow (bool [N]; of `rows` only, bool [len(rows)], where given)."""
        def of(values: np.ndarray) -> np.ndarray:
            return values if rows is None else values[rows]

        keep = np.ones(len(self.catalogue) if rows is None else len(rows), dtype=bool)
        if filters.categories is not None:
            keep &= np.logical_or.reduce([of(self._category_mask(c)) for c in filters.categories]
                                         or [np.zeros_like(keep)])  # fmt: skip
        if filters.min_price is not None or filters.max_price is not None:
            if not self._items.has_prices:
                raise ValueError("Filter 'price' cannot be applied: this catalogue has no prices.")
            price = of(self.prices)
            known = np.isfinite(price)
            low = -np.inf if filters.min_price is None else filters.min_price
            high = np.inf if filters.max_price is None else filters.max_price
            keep &= known & (np.nan_to_num(price) >= low) & (np.nan_to_num(price) <= high)
        if filters.available is not None:
            allowed = np.asarray([self.row_of_item(i, field="available") for i in filters.available], dtype=np.int64)
            if rows is None:
                mask = np.zeros_like(keep)
                mask[allowed] = True
                keep &= mask
            else:
                keep &= np.isin(rows, allowed)
        return keep

    def _category_mask(self, category: str) -> np.ndarray:
        items = self._items  # the cache belongs to this table: a swapped-in one starts its own
        mask = items.category_masks.get(category)
        if mask is None:
            mask = np.fromiter((category in cats for cats in items.categories), dtype=bool,
                               count=len(items.categories))  # fmt: skip
            if not mask.any():
                raise ValueError(f"Filter 'categories': no catalogue item is in category {category!r}.")
            items.category_masks[category] = mask
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
        _, history, free = self._query(self.row_of_user(user))
        if not isinstance(top, int) or top < 1:
            raise ValueError(f"top must be a positive integer, got {top!r}.")
        return self._contributions(history, free, self.row_of_item(item), top)

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
        vector, history, _ = self._query(row)
        query = vector + self.table.vectors[basket_rows].mean(axis=0)
        ranking = self.table.scores(query)
        ranking[history] = -np.inf
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
        return embed(self.content_tower, np.asarray(features, dtype=np.float32))

    def add_items(self, items: Sequence[Mapping]) -> list[str]:
        """Add new items to the served catalogue; returns their ids.

        Each item is {"item", "features"[, "title", "categories", "price"]}, with
        the catalogue's content features in its feature order; it is embedded by
        the content tower alone. An id already served is refused
        (ItemExistsError). Saved in the state dir, the items survive a restart
        and a snapshot reload, until the server's catalogue carries them.
        """
        refresh = self.prepare_items(items)
        self.apply_refresh(refresh)
        return refresh.added

    def prepare_items(self, items: Sequence[Mapping]) -> Refresh:
        """add_items' work, off to the side: validate, build the larger table, save; nothing served changes."""
        served = self._items
        parsed = parse_new_items(items, served.catalogue)
        grown = served.with_local(parsed)  # embeds them: refuses a model without a content tower first
        added = [entry["item"] for entry in parsed]
        if self.store is None:
            return Refresh(items=grown, added=added)
        before, after = self.store.update(LOCAL_ITEMS, lambda saved: {"items": stored_local_items(saved) + parsed})
        if self._sync is None or self._sync.synced[LOCAL_ITEMS] == before:
            return Refresh(versions={LOCAL_ITEMS: after}, items=grown, added=added)
        # Another process added items meanwhile: serve the saved list, in its order (rows stay put).
        served_items, versions = self._sync.load_items()
        return Refresh(versions=versions, items=served_items, added=added)

    # ------------------------------------------------------------------ real time

    def refresh(self, force: bool = False) -> dict:
        """Take in what was saved into the state dir since it was loaded; returns `status()`.

        A newer item-tower snapshot (or local items) is built in full, then
        swapped in; newer user rows replace the served ones, except the rows
        record() changed since, which are re-fitted on top of the trained row and
        saved. `force` reloads everything even when nothing looks newer. A
        snapshot that fails to load leaves the served one in place and is named
        in `status()["reload_error"]`.
        """
        self.apply_refresh(self.prepare_refresh(force))
        return self.status()

    def prepare_refresh(self, force: bool = False) -> Refresh | None:
        """refresh()'s reading and building, off to the side: nothing served changes (a worker thread may run it)."""
        if self._sync is None:
            if force:
                raise ValueError("This Recommender was not loaded from a state dir, so there is nothing to reload.")
            return None
        return self._sync.prepare(force)

    def apply_refresh(self, refresh: Refresh | None) -> None:
        """Swap in what prepare_refresh / prepare_items built (call it from the serving thread)."""
        if refresh is None:
            return
        if refresh.items is not None:
            self._items = refresh.items  # one assignment: a request holds the old table or the new one
            self._prior = None
        if refresh.users is not None and refresh.versions[USERS] >= self._sync.synced[USERS]:
            # (a table older than one saved here since is skipped.) Marked first, so that rows it re-fits
            # and saves count as saved over the served table.
            self._sync.taken_in({USERS: refresh.versions[USERS]})
            self._take_in_users(refresh.users)
        if self._sync is not None:
            self._sync.taken_in(refresh.versions)  # max(): a later save of ours stays the served one

    def _take_in_users(self, saved: dict) -> None:
        """A users table someone else (a training round) saved: its rows replace ours.

        Rows record() changed since the last table came in are kept when the
        saved row is ours; otherwise (training saved after us) the trained row is
        the new base and the recorded events are fitted again on top of it.
        """
        table = saved["embeddings"].float().numpy()
        refitted = {}
        for where, user in enumerate(saved["users"]):
            row = self._user_row.get(user)
            if row is None:
                continue  # a user this server never loaded (its history is in the data): at the next start
            trained_row = table[where]
            if user in self._changed and not np.array_equal(trained_row, self.free[row]):
                self.free[row] = trained_row
                self._refit(row)
                refitted[user] = trained_row
            elif user not in self._changed:
                self.free[row] = trained_row
            self._new_users.discard(user)  # a round trained them
        self._changed.clear()
        self._prior = None
        if refitted:
            self._save_rows(refitted)

    def status(self) -> dict:
        """What is served: the snapshot's generation and round, local items, the last reload error (no users)."""
        items = self._items
        errors = list(self._sync.errors.values()) if self._sync is not None else []
        index = items.table.index
        search = {"kind": "exact"} if index is None else {**index.stats.to_dict(), "fallbacks": self._index_fallbacks}
        return {"items": len(items.catalogue), "local_items": len(items.local_ids),
                "snapshot": {"generation": items.generation, "round": items.round, "loaded_at": items.loaded_at},
                "search": search, "reload_error": "; ".join(errors) or None}  # fmt: skip


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


def _user_table(saved: dict | None, data_users: list[str], dim: int) -> tuple[list[str], np.ndarray, list[str]]:
    """The saved users (in saved order) plus any user of the node's data not trained yet (zero vector, and
    listed as new: served by pooling until a round trains them)."""
    users = list(saved["users"]) if saved else []
    table = saved["embeddings"].float().numpy() if saved else np.zeros((0, dim), np.float32)
    if table.shape[1] != dim:
        raise ValueError(f"Saved user embeddings have dim {table.shape[1]}, the item tower {dim}.")
    known = set(users)
    extra = [u for u in data_users if u not in known]
    if extra:
        table = np.vstack([table, np.zeros((len(extra), dim), np.float32)])
    return users + extra, table, extra
