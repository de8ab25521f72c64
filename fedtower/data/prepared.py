"""Events -> per-user train/test histories in item-index rows.

The shape every trainer and evaluator works from, centrally or on a client.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedtower.data.protocols import NEGATIVE_POOLS, SplitSpec
from fedtower.data.schema import Dataset
from fedtower.data.splits import leave_one_out, temporal_split
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
class SampledCandidates:
    """Held-out items, each with its own negatives, for sampled HR@k / NDCG@k (the NCF protocol's figure).

    Row r: user row `user_rows[r]` (of the split's users), its held-out item `positives[r]`, and
    `negatives[r]` (item rows it is ranked against). `source` says where the negatives came from.
    """

    user_rows: np.ndarray  # int64 [R]
    positives: np.ndarray  # int64 [R]
    negatives: np.ndarray  # int64 [R, M]
    source: str

    def __len__(self) -> int:
        return len(self.user_rows)

    def subset(self, new_row_of_old: np.ndarray) -> SampledCandidates:
        """The rows of the users kept, renumbered (`new_row_of_old[u]` is -1 for a user dropped)."""
        new_rows = new_row_of_old[self.user_rows]
        kept = new_rows >= 0
        return SampledCandidates(new_rows[kept], self.positives[kept], self.negatives[kept], self.source)


@dataclass
class PreparedSplit:
    """Train and test histories of the same users, split as `protocol` says.

    `sampled` holds the held-out items with their own negatives when the split has them (leave-one-out
    with negatives, or a given test file with a negatives column); full-ranking metrics use `test`.
    """

    num_items: int
    train: UserHistories
    test: UserHistories
    sampled: SampledCandidates | None = None
    protocol: str = SplitSpec().describe()
    kind: str = "temporal"  # temporal, leave-one-out, none or given

    @property
    def users(self) -> list[str]:
        return self.train.users

    @property
    def evaluable(self) -> bool:
        """Whether the protocol holds anything out. Decided by the protocol alone, never by the data: a node
        whose reply depended on its data having test rows would tell the coordinator so outside DP."""
        return self.kind != "none"

    def subset(self, users: list[str]) -> PreparedSplit:
        """The split of a group of users, as `prepare_split` of their events alone would make it: the
        interactions, the split and the histories are all per user (leave-one-out's negatives are the whole
        split's). Users we do not hold (no event that counts) are left out, as `prepare_split` leaves them
        out; the rest stay sorted."""
        kept = sorted(user for user in set(map(str, users)) if user in self.train._position)
        sampled = None
        if self.sampled is not None:
            new_row_of_old = np.full(len(self.users), -1, dtype=np.int64)
            new_row_of_old[[self.train._position[user] for user in kept]] = np.arange(len(kept))
            sampled = self.sampled.subset(new_row_of_old)
        return PreparedSplit(num_items=self.num_items, train=self.train.subset(kept), test=self.test.subset(kept),
                             sampled=sampled, protocol=self.protocol, kind=self.kind)  # fmt: skip

    def popularity(self) -> np.ndarray:
        """Training users per item (for the popularity baseline and novelty)."""
        return np.bincount(self.train.items, minlength=self.num_items).astype(np.int64)


def prepare_split(
    dataset: Dataset,
    weights: BehaviourWeights | None = None,
    *,
    test_fraction: float = 0.2,
    spec: SplitSpec | None = None,
) -> PreparedSplit:
    """Implicit interactions, split per user as `spec` says (default: BENCHMARKS.md's temporal protocol)."""
    spec = spec or SplitSpec(test_fraction=test_fraction)
    weights = weights or BehaviourWeights()
    interactions = weights.to_interactions(dataset.events, dataset.catalogue.index)
    users = sorted(interactions["user"].astype(str).unique())
    sampled = None
    if spec.kind == "temporal":
        train, test = temporal_split(interactions, test_fraction=spec.test_fraction)
    elif spec.kind == "none":
        train, test = interactions, interactions.iloc[:0]
    else:
        loo = leave_one_out(interactions, num_negatives=spec.num_negatives, seed=spec.seed,
                            num_items=len(dataset.catalogue), pool=spec.negative_pool)  # fmt: skip
        train, test = loo.train, loo.test
        if spec.num_negatives:
            user_rows = pd.Index(users).get_indexer(loo.test_items.index.astype(str))
            sampled = SampledCandidates(user_rows.astype(np.int64), loo.test_items.to_numpy(dtype=np.int64),
                                        loo.negatives.astype(np.int64),
                                        f"{spec.num_negatives} per user: {NEGATIVE_POOLS[spec.negative_pool]}")
    return PreparedSplit(
        num_items=len(dataset.catalogue),
        train=UserHistories.from_interactions(train, users),
        test=UserHistories.from_interactions(test, users),
        sampled=sampled,
        protocol=spec.describe(),
        kind=spec.kind,
    )
