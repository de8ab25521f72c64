"""Evaluation splits and per-user histories over an interaction frame.

An interaction frame has at least the columns user (str), item (int64 row in
the item index) and timestamp (int64), as `BehaviourWeights.to_interactions`
returns; other columns (e.g. weight) are carried through. Every function here
orders a user's interactions by (timestamp, item row), so ties in time are
broken the same way everywhere, and orders users by their id as a string.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from fedtower.data.protocols import NEGATIVE_POOLS, SPLITS, SplitSpec  # noqa: F401 (re-exported)


class TemporalSplit(NamedTuple):
    """Train and test interactions, both sorted by (user, timestamp, item)."""

    train: pd.DataFrame
    test: pd.DataFrame

    @property
    def train_only_users(self) -> int:
        """Users kept wholly in train because they had fewer than 2 interactions."""
        train_users = pd.Index(self.train["user"].unique())
        return int((~train_users.isin(self.test["user"])).sum())


class LeaveOneOut(NamedTuple):
    """The NCF protocol's split.

    `test_items` is indexed by user id (sorted as strings) and holds each
    evaluated user's held-out item row; row i of `negatives` (shape
    users x num_negatives) holds the sampled negatives of `test_items.index[i]`.
    `pool` says which items the negatives were drawn from (see NEGATIVE_POOLS); `test` holds the held-out
    interactions as rows of the input frame (one per evaluated user).
    """

    train: pd.DataFrame
    test_items: pd.Series
    negatives: np.ndarray
    pool: str = "interacted"
    test: pd.DataFrame | None = None


def temporal_split(interactions: pd.DataFrame, *, test_fraction: float = 0.2) -> TemporalSplit:
    """Per user, the latest ceil(test_fraction * n) interactions go to test, the rest to train.

    This is the benchmark protocol. Every evaluated user keeps at least one
    interaction in test and one in train. Users with fewer than 2 interactions
    cannot be evaluated, so all of theirs stay in train; `train_only_users` on
    the result counts them.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"The test fraction must be between 0 and 1, but it is {test_fraction}.")
    ordered, user_codes = _sorted_by_user_time(interactions)
    rank, count = _rank_within_user(user_codes)
    # Rounding first keeps e.g. 0.07 * 100 = 7.000000000000001 from becoming 8.
    wanted = np.ceil(np.round(test_fraction * count, 9)).astype(np.int64)
    test_count = np.where(count >= 2, np.clip(wanted, 1, count - 1), 0)
    is_test = rank >= count - test_count
    return TemporalSplit(
        train=ordered[~is_test].reset_index(drop=True),
        test=ordered[is_test].reset_index(drop=True),
    )


def leave_one_out(
    interactions: pd.DataFrame,
    *,
    num_negatives: int = 99,
    seed: int,
    num_items: int | None = None,
    pool: str = "interacted",
) -> LeaveOneOut:
    """Hold out each user's latest interaction and sample negatives for it.

    Negatives are distinct item rows drawn uniformly from `pool` less the items
    the user interacted with (train or test): "interacted" (the NCF protocol)
    draws among the items that occur in `interactions`, "catalogue" among rows
    0..num_items-1 (default: up to the largest row seen). The same seed gives
    the same negatives. Users with fewer than 2 interactions stay wholly in
    train and are not evaluated. `num_negatives = 0` samples none.
    """
    if num_negatives < 0:
        raise ValueError(f"The number of negatives must be 0 or more, but it is {num_negatives}.")
    if pool not in NEGATIVE_POOLS:
        raise ValueError(f"The negative pool must be one of {list(NEGATIVE_POOLS)}, but it is {pool!r}.")
    ordered, user_codes = _sorted_by_user_time(interactions)
    rank, count = _rank_within_user(user_codes)
    items = ordered["item"].to_numpy(dtype=np.int64)
    if num_items is None:
        num_items = int(items.max()) + 1 if len(items) else 0
    if len(items) and items.max() >= num_items:
        raise ValueError(f"Item row {items.max()} is outside a catalogue of {num_items} items.")
    is_test = (rank == count - 1) & (count >= 2)
    test = ordered[is_test]
    evaluated = user_codes[is_test]
    # Sample positions in the pool; every item a user saw is in either pool.
    candidates = np.unique(items) if pool == "interacted" else np.arange(num_items, dtype=np.int64)
    size = len(candidates)
    positions = np.searchsorted(candidates, items)
    # Seen (user, pool position) pairs as sorted keys, for fast membership tests.
    seen_keys = np.unique(user_codes * size + positions)
    free = size - np.bincount(seen_keys // max(size, 1), minlength=user_codes.max(initial=-1) + 1)
    short = evaluated[free[evaluated] < num_negatives]
    if short.size:
        user = test["user"].iloc[int(np.searchsorted(evaluated, short[0]))]
        where = "items in the interaction data" if pool == "interacted" else "catalogue items"
        raise ValueError(
            f"User {user!r} has fewer than {num_negatives} {where} it never interacted with, "
            "so its negatives cannot be sampled."
        )
    rng = np.random.default_rng(seed)
    drawn = np.empty((len(evaluated), 0), dtype=np.int64)
    if num_negatives:
        drawn = _sample_negatives(evaluated, seen_keys, size, num_negatives, rng)
    test_items = pd.Series(
        test["item"].to_numpy(dtype=np.int64),
        index=pd.Index(test["user"], name="user"),
        name="item",
    )
    return LeaveOneOut(ordered[~is_test].reset_index(drop=True), test_items, candidates[drawn], pool,
                       test.reset_index(drop=True))


def history_csr(interactions: pd.DataFrame, users: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Item rows per user in time order, CSR style.

    Returns (indptr, items): the history of users[u] is items[indptr[u]:indptr[u+1]].
    Users with no interactions get an empty slice; interactions of users not
    listed are ignored.
    """
    wanted = pd.Index([str(u) for u in users])
    if not wanted.is_unique:
        raise ValueError("The user list names some user more than once.")
    position = wanted.get_indexer(interactions["user"].astype(str))
    listed = position >= 0
    position = position[listed]
    timestamp = interactions["timestamp"].to_numpy(dtype=np.int64)[listed]
    items = interactions["item"].to_numpy(dtype=np.int64)[listed]
    order = np.lexsort((items, timestamp, position))
    indptr = np.zeros(len(wanted) + 1, dtype=np.int64)
    np.cumsum(np.bincount(position, minlength=len(wanted)), out=indptr[1:])
    return indptr, items[order]


def user_histories(interactions: pd.DataFrame, users: list[str]) -> list[np.ndarray]:
    """Item rows per user in time order, one array per entry of `users`."""
    indptr, items = history_csr(interactions, users)
    return np.split(items, indptr[1:-1])


def _sorted_by_user_time(interactions: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """The frame sorted by (user, timestamp, item), and each row's user code (0, 1, ...)."""
    missing = [c for c in ("user", "item", "timestamp") if c not in interactions.columns]
    if missing:
        raise ValueError(f"The interaction frame is missing columns {missing}.")
    user_codes, _ = pd.factorize(interactions["user"].astype(str), sort=True)
    order = np.lexsort(
        (
            interactions["item"].to_numpy(dtype=np.int64),
            interactions["timestamp"].to_numpy(dtype=np.int64),
            user_codes,
        )
    )
    ordered = interactions.iloc[order].reset_index(drop=True)
    return ordered, user_codes[order].astype(np.int64)


def _rank_within_user(sorted_user_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows grouped by user: each row's position in its user's run, and that run's length."""
    n = len(sorted_user_codes)
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_user_codes)) + 1]
    lengths = np.diff(np.r_[starts, n])
    rank = np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)
    return rank, np.repeat(lengths, lengths)


def _sample_negatives(
    users: np.ndarray, seen_keys: np.ndarray, num_items: int, k: int, rng: np.random.Generator
) -> np.ndarray:
    """k distinct unseen items per user, by rejection sampling in vectorised rounds."""
    negatives = np.empty((len(users), k), dtype=np.int64)
    pending = np.arange(len(users))
    width = 2 * k + 16
    for _ in range(4):
        if not pending.size:
            return negatives
        drawn = rng.integers(0, num_items, size=(pending.size, width))
        keys = users[pending, None] * num_items + drawn
        first = np.zeros(keys.size, dtype=bool)
        first[np.unique(keys.ravel(), return_index=True)[1]] = True
        usable = first.reshape(keys.shape) & ~_contains_sorted(seen_keys, keys)
        enough = usable.sum(axis=1) >= k
        # Keep the first k usable draws of each row, in draw order.
        usable = usable[enough] & (np.cumsum(usable[enough], axis=1) <= k)
        negatives[pending[enough]] = drawn[enough][usable].reshape(-1, k)
        pending = pending[~enough]
        width *= 4
    # Users who interacted with most of the catalogue: sample their complement exactly.
    for row in pending:
        user = users[row]
        seen = seen_keys[np.searchsorted(seen_keys, user * num_items) :]
        seen = seen[seen < (user + 1) * num_items] - user * num_items
        negatives[row] = rng.choice(np.setdiff1d(np.arange(num_items), seen), size=k, replace=False)
    return negatives


def _contains_sorted(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if not sorted_keys.size:
        return np.zeros(keys.shape, dtype=bool)
    position = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return sorted_keys[position] == keys
