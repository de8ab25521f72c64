"""Events -> per-user train/test histories in item-index rows.

The shape every trainer and evaluator works from, centrally or on a client.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedtower.data.schema import Dataset
from fedtower.data.splits import temporal_split
from fedtower.data.weights import BehaviourWeights


@dataclass
class UserHistories:
    """Per-user interactions in time order (CSR): users[u] owns items[indptr[u]:indptr[u+1]]."""

    users: list[str]
    indptr: np.ndarray
    items: np.ndarray
    weights: np.ndarray  # float32 label weight of each interaction

    def __len__(self) -> int:
        return len(self.users)

    def items_of(self, u: int) -> np.ndarray:
        return self.items[self.indptr[u] : self.indptr[u + 1]]

    def weights_of(self, u: int) -> np.ndarray:
        return self.weights[self.indptr[u] : self.indptr[u + 1]]

    def as_lists(self) -> list[np.ndarray]:
        return np.split(self.items, self.indptr[1:-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    @functools.cached_property
    def _position(self) -> dict[str, int]:
        return {user: u for u, user in enumerate(self.users)}

    def subset(self, users: list[str]) -> UserHistories:
        """The histories of `users` (in that order; each must be one of ours), as their own CSR."""
        rows = np.fromiter((self._position[user] for user in users), dtype=np.int64, count=len(users))
        lengths = self.indptr[rows + 1] - self.indptr[rows]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        take = np.concatenate([np.arange(self.indptr[r], self.indptr[r + 1]) for r in rows]) if len(rows) else \
            np.empty(0, np.int64)  # fmt: skip
        return UserHistories(list(users), indptr, self.items[take], self.weights[take])

    @classmethod
    def from_interactions(cls, interactions: pd.DataFrame, users: list[str]) -> UserHistories:
        """Histories of `users` (in that order), each sorted by (timestamp, item row)."""
        position = pd.Index(users).get_indexer(interactions["user"].astype(str))
        listed = position >= 0
        items = interactions["item"].to_numpy(dtype=np.int64)[listed]
        timestamps = interactions["timestamp"].to_numpy(dtype=np.int64)[listed]
        weights = interactions["weight"].to_numpy(dtype=np.float32)[listed]
        position = position[listed]
        order = np.lexsort((items, timestamps, position))
        indptr = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(np.bincount(position, minlength=len(users)), out=indptr[1:])
        return cls(list(users), indptr, items[order], weights[order])


@dataclass
class PreparedSplit:
    """Train and test histories of the same users under the fixed temporal protocol."""

    num_items: int
    train: UserHistories
    test: UserHistories

    @property
    def users(self) -> list[str]:
        return self.train.users

    def subset(self, users: list[str]) -> PreparedSplit:
        """The split of a group of users, as `prepare_split` of their events alone would make it: the
        interactions, the temporal split and the histories are all per user. Users we do not hold (no
        event that counts) are left out, as `prepare_split` leaves them out; the rest stay sorted."""
        kept = sorted(user for user in set(map(str, users)) if user in self.train._position)
        return PreparedSplit(num_items=self.num_items, train=self.train.subset(kept), test=self.test.subset(kept))

    def popularity(self) -> np.ndarray:
        """Training users per item (for the popularity baseline and novelty)."""
        return np.bincount(self.train.items, minlength=self.num_items).astype(np.int64)


def prepare_split(
    dataset: Dataset,
    weights: BehaviourWeights | None = None,
    *,
    test_fraction: float = 0.2,
) -> PreparedSplit:
    """Implicit interactions, split per user by time (BENCHMARKS.md protocol)."""
    weights = weights or BehaviourWeights()
    interactions = weights.to_interactions(dataset.events, dataset.catalogue.index)
    train, test = temporal_split(interactions, test_fraction=test_fraction)
    users = sorted(interactions["user"].astype(str).unique())
    return PreparedSplit(
        num_items=len(dataset.catalogue),
        train=UserHistories.from_interactions(train, users),
        test=UserHistories.from_interactions(test, users),
    )
