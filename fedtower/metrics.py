"""Ranking metrics of the offline protocol in BENCHMARKS.md, exact and mergeable.

Conventions shared by every function here:

- Items are catalogue rows 0..N-1. A ranked list is best first; rank_top_k pads
  lists with -1 when a user has fewer than k candidates, and -1 is never a hit.
- Candidates are all items except the user's excluded (training) items.
  Excluded items are never recommended and are not candidates for MRR or AUC.
- Ties in score are broken by the lower item row, everywhere.
- Relevant items are taken as given: one that is also excluded can never be
  hit, yet still counts in |relevant| (Recall = hits / |test items|).
- Means are over users (or over recommended items for novelty). evaluate_scores
  returns sums, so blocks of users (chunks, or federated clients) can be added
  up and finalized once: the result is the mean over all users, never a mean of
  block means.
- A mean whose denominator is zero (no users, no pairs) is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_K = 20
SAMPLED_K = 10

__all__ = [
    "DEFAULT_K",
    "SAMPLED_K",
    "RankingSums",
    "auc",
    "coverage_at_k",
    "evaluate_scores",
    "format_table",
    "intra_list_diversity",
    "ndcg_at_k",
    "novelty_at_k",
    "popularity_counts",
    "precision_at_k",
    "rank_top_k",
    "recall_at_k",
    "reciprocal_rank",
    "sampled_hit_and_ndcg",
]


# ---------------------------------------------------------------- validation


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}.")
    return int(k)


def _item_rows(values: Any, what: str, *, allow_padding: bool = False) -> np.ndarray:
    """A 1-D int64 array of item rows; -1 is accepted only as ranked-list padding."""
    rows = np.asarray(list(values) if isinstance(values, (set, frozenset)) else values)
    rows = rows.ravel()
    if rows.size == 0:
        return rows.astype(np.int64)
    if rows.dtype.kind not in "iu":
        raise ValueError(f"The {what} items must be integer item rows; got dtype {rows.dtype}.")
    lowest = -1 if allow_padding else 0
    if rows.min() < lowest:
        raise ValueError(f"The {what} items contain the negative item row {rows.min()}.")
    return rows.astype(np.int64)


def _score_matrix(scores: Any) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"Scores must be a [users, items] matrix; got shape {scores.shape}.")
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float64)
    # NaN is reserved internally to mark excluded items, and has no order anyway.
    if np.isnan(scores).any():
        raise ValueError("Scores contain NaN; every candidate item needs a comparable score.")
    return scores


def _per_user_mask(rows_per_user: Any, num_users: int, num_items: int, what: str) -> np.ndarray:
    """Dense [users, items] mask from a list of item-row arrays or a CSR-like object.

    CSR-like means anything with `indptr` and `indices` (scipy.sparse CSR included).
    """
    mask = np.zeros((num_users, num_items), dtype=bool)
    if rows_per_user is None:
        return mask
    if hasattr(rows_per_user, "indptr") and hasattr(rows_per_user, "indices"):
        indptr = np.asarray(rows_per_user.indptr, dtype=np.int64)
        if indptr.size != num_users + 1:
            raise ValueError(
                f"The {what} CSR structure has {indptr.size - 1} rows but the scores have "
                f"{num_users} users."
            )
        lengths = np.diff(indptr)
        items = _item_rows(np.asarray(rows_per_user.indices)[indptr[0] : indptr[-1]], what)
    else:
        per_user = [_item_rows(rows, what) for rows in rows_per_user]
        if len(per_user) != num_users:
            raise ValueError(
                f"The {what} list has {len(per_user)} entries but the scores have "
                f"{num_users} users; give one array per user."
            )
        lengths = np.array([rows.size for rows in per_user], dtype=np.int64)
        items = np.concatenate(per_user) if per_user else np.zeros(0, np.int64)
    if items.size and items.max() >= num_items:
        raise ValueError(
            f"The {what} items contain row {items.max()}, outside the catalogue of "
            f"{num_items} items."
        )
    mask[np.repeat(np.arange(num_users), lengths), items] = True
    return mask


# ---------------------------------------------------------------- per user


def _discounts(length: int) -> np.ndarray:
    """1 / log2(rank + 1) for 1-based ranks 1..length."""
    return 1.0 / np.log2(np.arange(2, length + 2, dtype=np.float64))


def _ideal_dcg(k: int) -> np.ndarray:
    """IDCG for 0..k relevant items: entry m is the DCG of m hits at the top."""
    return np.concatenate([[0.0], np.cumsum(_discounts(k))])


def _hit_flags(ranked: Any, relevant: Any, length: int | None) -> tuple[np.ndarray, int]:
    """Hit flag per ranked position (first `length` positions), and |relevant|."""
    items = _item_rows(ranked, "ranked", allow_padding=True)
    real = items[items >= 0]
    if np.unique(real).size != real.size:
        raise ValueError("The ranked list repeats an item; each item can be ranked only once.")
    wanted = np.unique(_item_rows(relevant, "relevant"))
    if wanted.size == 0:
        raise ValueError(
            "The relevant set is empty, so the metric is undefined; skip users without "
            "relevant items."
        )
    return np.isin(items[:length], wanted), int(wanted.size)


def recall_at_k(ranked: Any, relevant: Any, k: int = DEFAULT_K) -> float:
    """Hits in the first k ranked items / |relevant|."""
    hits, num_relevant = _hit_flags(ranked, relevant, _check_k(k))
    return float(hits.sum() / num_relevant)


def precision_at_k(ranked: Any, relevant: Any, k: int = DEFAULT_K) -> float:
    """Hits in the first k ranked items / k (also when fewer than k items were ranked)."""
    k = _check_k(k)
    hits, _ = _hit_flags(ranked, relevant, k)
    return float(hits.sum() / k)


def ndcg_at_k(ranked: Any, relevant: Any, k: int = DEFAULT_K) -> float:
    """Binary-gain NDCG: sum of 1/log2(r+1) over hits, over IDCG of min(|relevant|, k) hits."""
    k = _check_k(k)
    hits, num_relevant = _hit_flags(ranked, relevant, k)
    dcg = float(np.sum(_discounts(hits.size)[hits]))
    return dcg / float(_ideal_dcg(k)[min(num_relevant, k)])


def reciprocal_rank(ranked: Any, relevant: Any) -> float:
    """1 / rank of the first relevant item in `ranked`, 0 if there is none.

    Not truncated at k: pass the user's full candidate ranking (evaluate_scores
    does). Passing a top-k list instead gives the truncated RR@k.
    """
    hits, _ = _hit_flags(ranked, relevant, None)
    first = np.flatnonzero(hits)
    return 1.0 / (first[0] + 1) if first.size else 0.0


def auc(scores: Any, relevant: Any, exclude: Any = None) -> float:
    """Share of (relevant, non-relevant) candidate pairs scored in the right order.

    `scores` is one user's score vector over the catalogue. Ties count 1/2.
    Excluded items are not candidates. NaN when there is no such pair.
    """
    scores = _score_matrix(np.asarray(scores)[None, :])[0]
    candidate = ~_per_user_mask([[] if exclude is None else exclude], 1, scores.size, "exclude")[0]
    positive = _per_user_mask([relevant], 1, scores.size, "relevant")[0] & candidate
    pos, neg = scores[positive], scores[candidate & ~positive]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    # Plain pairwise comparison: the reference the vectorised path is tested against.
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


def sampled_hit_and_ndcg(pos_score: Any, neg_scores: Any, k: int = SAMPLED_K):
    """HR@k and NDCG@k of the NCF leave-one-out protocol (1 positive vs sampled negatives).

    Pessimistic ties: a negative scored equal to the positive ranks above it, so
    rank = 1 + #(negatives with score >= positive). A constant model therefore
    scores 0, not a lucky 1. Scalars give floats; a batch (pos [U], neg [U, M])
    gives arrays [U].
    """
    k = _check_k(k)
    pos = np.asarray(pos_score, dtype=np.float64)
    neg = np.asarray(neg_scores, dtype=np.float64)
    if neg.shape[:-1] != pos.shape:
        raise ValueError(
            f"Negative scores of shape {neg.shape} do not match positive scores of shape "
            f"{pos.shape}; expected {pos.shape + ('negatives',)}."
        )
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise ValueError("Sampled scores contain NaN; every item needs a comparable score.")
    rank = 1 + np.sum(neg >= pos[..., None], axis=-1)
    hit = rank <= k
    ndcg = np.where(hit, 1.0 / np.log2(rank + 1.0), 0.0)
    if pos.ndim == 0:
        return float(hit), float(ndcg)
    return hit.astype(np.float64), ndcg


# ---------------------------------------------------------------- catalogue level


def popularity_counts(train_items: Any, num_items: int) -> np.ndarray:
    """Training interactions per catalogue item (int64 [num_items]).

    For novelty, pass one entry per distinct (user, item) pair, so that the count
    is a number of users and never exceeds the number of training users.
    """
    items = _item_rows(train_items, "training")
    if items.size and items.max() >= num_items:
        raise ValueError(
            f"The training items contain row {items.max()}, outside the catalogue of "
            f"{num_items} items."
        )
    return np.bincount(items, minlength=num_items).astype(np.int64)


def _item_novelty(popularity: Any, num_users: int | None, num_items: int) -> np.ndarray | None:
    """-log2((popularity + 1) / (num_users + 1)) per item, or None without popularity."""
    if popularity is None and num_users is None:
        return None
    if popularity is None or num_users is None:
        raise ValueError(
            "Novelty needs both popularity and num_popularity_users; pass both or neither."
        )
    popularity = np.asarray(popularity)
    if popularity.shape != (num_items,):
        raise ValueError(
            f"Popularity has shape {popularity.shape}; expected one count per item ({num_items},)."
        )
    if popularity.size and (popularity.min() < 0 or popularity.max() > num_users):
        raise ValueError(
            f"Popularity counts must lie in 0..{num_users} (the number of training users); "
            "count each user at most once per item."
        )
    return -np.log2((popularity.astype(np.float64) + 1.0) / (num_users + 1.0))


def _unit_vectors(item_vectors: Any, num_items: int) -> np.ndarray | None:
    """Rows scaled to unit length; zero rows stay zero, so their cosine with anything is 0."""
    if item_vectors is None:
        return None
    vectors = np.asarray(item_vectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != num_items:
        raise ValueError(
            f"Item vectors have shape {vectors.shape}; expected ({num_items}, dimensions)."
        )
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def coverage_at_k(top_k: Any, num_items: int) -> float:
    """Share of the catalogue that appears in any user's list (rows of `top_k`)."""
    items = _item_rows(top_k, "recommended", allow_padding=True)
    return float(np.unique(items[items >= 0]).size / num_items)


def novelty_at_k(top_k: Any, popularity: Any, num_users: int) -> float:
    """Mean over all recommended items (all lists) of -log2((popularity + 1) / (num_users + 1))."""
    items = _item_rows(top_k, "recommended", allow_padding=True)
    items = items[items >= 0]
    per_item = _item_novelty(popularity, num_users, np.asarray(popularity).size)
    return float(per_item[items].mean()) if items.size else math.nan


def intra_list_diversity(ranked: Any, item_vectors: Any) -> float:
    """Mean over item pairs in one list of 1 - cosine similarity of their vectors.

    A zero vector has cosine 0 with everything (distance 1). NaN for fewer than 2 items.
    """
    items = _item_rows(ranked, "ranked", allow_padding=True)
    items = items[items >= 0]
    if items.size < 2:
        return math.nan
    vectors = np.asarray(item_vectors, dtype=np.float64)
    unit = _unit_vectors(vectors, vectors.shape[0])[items]
    distances = [
        1.0 - unit[i] @ unit[j] for i in range(items.size) for j in range(i + 1, items.size)
    ]
    return float(np.mean(distances))


# ---------------------------------------------------------------- top k


def _top_k(masked: np.ndarray, k: int) -> np.ndarray:
    """Top k rows per user of a score matrix whose excluded entries are NaN.

    Selects with a partition (no full sort): take everything strictly above the
    k-th best score, then fill up with the lowest rows tied at it. Only the k
    chosen items are then sorted.
    """
    num_users, num_items = masked.shape
    top = np.full((num_users, k), -1, dtype=np.int64)
    width = min(k, num_items)
    if num_users == 0 or width == 0:
        return top
    # Ascending order of the negated scores is best first; NaN (excluded) sorts last.
    negated = np.negative(masked)
    threshold = np.partition(negated, width - 1, axis=1)[:, width - 1]
    fewer_candidates = np.isnan(threshold)  # fewer than k candidates: take them all
    chosen = negated < threshold[:, None]
    chosen[fewer_candidates] = ~np.isnan(negated[fewer_candidates])
    tied = negated == threshold[:, None]
    still_needed = width - chosen.sum(axis=1)
    chosen |= tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= still_needed[:, None])

    user, item = np.nonzero(chosen)  # row-major: ascending item rows within each user
    per_user = chosen.sum(axis=1)
    slot = np.arange(user.size) - np.repeat(np.cumsum(per_user) - per_user, per_user)
    top[user, slot] = item
    # Stable sort of the chosen scores keeps ascending rows among ties; padding (NaN) last.
    key = np.where(top >= 0, negated[np.arange(num_users)[:, None], np.maximum(top, 0)], np.nan)
    return np.take_along_axis(top, np.argsort(key, axis=1, kind="stable"), axis=1)


def _mask_excluded(scores: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    masked = scores.copy()
    masked[excluded] = np.nan
    return masked


def rank_top_k(scores: Any, exclude: Any = None, k: int = DEFAULT_K) -> np.ndarray:
    """Top k item rows per user, best first, as int64 [users, k].

    `exclude` is a list of item-row arrays (one per user) or a CSR-like object;
    excluded items rank below every candidate, even one scored -inf, and are never
    returned. Ties go to the lower item row. A user with fewer than k candidates
    gets a list padded with -1.
    """
    k = _check_k(k)
    scores = _score_matrix(scores)
    excluded = _per_user_mask(exclude, *scores.shape, "exclude")
    return _top_k(_mask_excluded(scores, excluded), k)


# ---------------------------------------------------------------- sums


def _no_items() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


_FLOAT_FIELDS = ("recall", "precision", "ndcg", "mrr", "auc", "novelty", "diversity")
_COUNT_FIELDS = (
    "users",
    "skipped_users",
    "hit_users",
    "auc_users",
    "novelty_items",
    "diversity_users",
)


@dataclass(eq=False)
class RankingSums:
    """Sums over evaluated users, to be merged across blocks and finalized once.

    `RankingSums()` is the empty identity of `+`; k = 0 and an empty
    `item_counts` mean "not set yet" and adopt the other side's values.
    `sum(parts, RankingSums())` merges a list.
    """

    k: int = 0
    users: int = 0  # users with at least one relevant item
    skipped_users: int = 0  # users without relevant items, left out of every metric
    recall: float = 0.0
    precision: float = 0.0
    ndcg: float = 0.0
    mrr: float = 0.0
    hit_users: int = 0  # users with a hit in their top k
    auc: float = 0.0
    auc_users: int = 0  # users with at least one (relevant, non-relevant) candidate pair
    item_counts: np.ndarray = field(default_factory=_no_items)  # times each item was recommended
    novelty: float = 0.0
    novelty_items: int = 0
    diversity: float = 0.0
    diversity_users: int = 0  # users with at least two recommended items

    def merge(self, other: RankingSums) -> RankingSums:
        if not isinstance(other, RankingSums):
            raise TypeError(f"Only RankingSums can be merged; got {type(other).__name__}.")
        if self.k and other.k and self.k != other.k:
            raise ValueError(
                f"Cannot merge sums computed at k={self.k} and k={other.k}; evaluate every "
                "block at the same k."
            )
        mine, theirs = self.item_counts, other.item_counts
        if mine.size and theirs.size and mine.size != theirs.size:
            raise ValueError(
                f"Cannot merge sums over catalogues of {mine.size} and {theirs.size} items; "
                "every block must score the same catalogue."
            )
        counts = mine + theirs if mine.size and theirs.size else (mine if mine.size else theirs)
        merged = {name: getattr(self, name) + getattr(other, name) for name in _FLOAT_FIELDS}
        merged |= {name: getattr(self, name) + getattr(other, name) for name in _COUNT_FIELDS}
        return RankingSums(k=self.k or other.k, **merged, item_counts=counts.copy())

    __add__ = merge

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RankingSums) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict[str, Any]:
        """Flat dict of ints, floats and int lists (JSON- and Flower-record friendly).

        Recommendation counts are sent sparsely: the rows recommended at least once
        and their counts.
        """
        rows = np.flatnonzero(self.item_counts)
        payload: dict[str, Any] = {"k": int(self.k)}
        payload |= {name: int(getattr(self, name)) for name in _COUNT_FIELDS}
        payload |= {name: float(getattr(self, name)) for name in _FLOAT_FIELDS}
        payload["num_items"] = int(self.item_counts.size)
        payload["recommended_rows"] = rows.tolist()
        payload["recommended_counts"] = self.item_counts[rows].tolist()
        return payload

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> RankingSums:
        """Inverse of to_dict. Keys that to_dict does not write are ignored."""
        expected = (
            "k",
            *_COUNT_FIELDS,
            *_FLOAT_FIELDS,
            "num_items",
            "recommended_rows",
            "recommended_counts",
        )
        missing = [name for name in expected if name not in payload]
        if missing:
            raise ValueError(f"The ranking sums payload is missing {', '.join(missing)}.")
        num_items = int(payload["num_items"])
        rows = np.asarray(payload["recommended_rows"], dtype=np.int64).ravel()
        counts = np.asarray(payload["recommended_counts"], dtype=np.int64).ravel()
        if rows.size != counts.size:
            raise ValueError(
                f"The payload lists {rows.size} recommended rows but {counts.size} counts."
            )
        if rows.size and (rows.min() < 0 or rows.max() >= num_items or counts.min() < 1):
            raise ValueError(
                f"The payload's recommended rows must lie in 0..{num_items - 1} with positive "
                "counts."
            )
        item_counts = np.zeros(num_items, dtype=np.int64)
        np.add.at(item_counts, rows, counts)
        values = {name: int(payload[name]) for name in ("k", *_COUNT_FIELDS)}
        values |= {name: float(payload[name]) for name in _FLOAT_FIELDS}
        return cls(**values, item_counts=item_counts)

    def finalize(self) -> dict[str, float]:
        """Means over users (novelty: over recommended items); NaN where nothing was counted."""
        if self.k == 0:
            raise ValueError("These ranking sums are empty (no block was evaluated yet).")
        k = self.k
        num_items = self.item_counts.size
        coverage = np.count_nonzero(self.item_counts) / num_items if num_items else math.nan
        return {
            f"recall@{k}": _mean(self.recall, self.users),
            f"precision@{k}": _mean(self.precision, self.users),
            f"ndcg@{k}": _mean(self.ndcg, self.users),
            "mrr": _mean(self.mrr, self.users),
            "auc": _mean(self.auc, self.auc_users),
            f"hr@{k}": _mean(self.hit_users, self.users),
            f"coverage@{k}": float(coverage),
            f"novelty@{k}": _mean(self.novelty, self.novelty_items),
            f"diversity@{k}": _mean(self.diversity, self.diversity_users),
            "users": self.users,
        }


def _mean(total: float, count: int) -> float:
    return float(total / count) if count else math.nan


@dataclass
class SampledSums:
    """HR@k / NDCG@k sums of held-out items ranked against their own sampled negatives (NCF style).

    One row is one held-out item with its negatives; mergeable like RankingSums.
    """

    k: int = 0
    rows: int = 0
    hits: float = 0.0
    ndcg: float = 0.0
    negatives: int = 0  # negatives per row (0: not set yet)

    def __add__(self, other: SampledSums) -> SampledSums:
        for name in ("k", "negatives"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine and theirs and mine != theirs:
                raise ValueError(f"Cannot merge sampled sums with {name} {mine} and {theirs}.")
        return SampledSums(self.k or other.k, self.rows + other.rows, self.hits + other.hits,
                           self.ndcg + other.ndcg, self.negatives or other.negatives)  # fmt: skip

    @classmethod
    def of(cls, pos_scores: Any, neg_scores: Any, k: int = SAMPLED_K) -> SampledSums:
        """Sums over a batch: pos_scores [R], neg_scores [R, M]."""
        hits, ndcg = sampled_hit_and_ndcg(pos_scores, neg_scores, k=k)
        return cls(k, int(np.size(hits)), float(np.sum(hits)), float(np.sum(ndcg)), int(np.shape(neg_scores)[-1]))

    def to_metrics(self) -> dict[str, int | float]:
        return {"sampled-k": self.k, "sampled-rows": self.rows, "sampled-hits": self.hits,
                "sampled-ndcg": self.ndcg, "sampled-negatives": self.negatives}  # fmt: skip

    @classmethod
    def from_metrics(cls, payload: Mapping[str, Any]) -> SampledSums | None:
        """The sums in a reply's metrics, or None when it sent none."""
        if "sampled-rows" not in payload:
            return None
        rows, hits = int(payload["sampled-rows"]), float(payload["sampled-hits"])
        ndcg = float(payload["sampled-ndcg"])
        if rows < 0 or not 0 <= hits <= rows or not 0 <= ndcg <= rows:
            raise ValueError(f"Sampled sums out of range: {rows} rows, {hits} hits, {ndcg} ndcg.")
        return cls(int(payload["sampled-k"]), rows, hits, ndcg, int(payload["sampled-negatives"]))

    def finalize(self) -> dict[str, float]:
        """HR@k and NDCG@k over the rows, keyed e.g. `sampled-hr@10`, and the rows and negatives behind them."""
        return {f"sampled-hr@{self.k}": _mean(self.hits, self.rows),
                f"sampled-ndcg@{self.k}": _mean(self.ndcg, self.rows),
                "sampled-rows": self.rows, "sampled-negatives": self.negatives}  # fmt: skip


# ---------------------------------------------------------------- evaluation


def _rank_based_sums(
    masked: np.ndarray, relevant: np.ndarray, excluded: np.ndarray
) -> tuple[float, float, int]:
    """Untruncated reciprocal rank and AUC, summed over users: (rr, auc, auc_users).

    One sort of each user's candidate scores answers both by binary search: how
    many candidates score below, equal to, or above each relevant item.
    """
    ascending = np.sort(masked, axis=1)  # excluded (NaN) entries sort last
    num_candidates = masked.shape[1] - excluded.sum(axis=1)
    rr_sum, auc_sum, auc_users = 0.0, 0.0, 0
    for user in range(masked.shape[0]):
        candidates = ascending[user, : num_candidates[user]]
        positive_rows = np.flatnonzero(relevant[user] & ~excluded[user])
        if positive_rows.size == 0:
            continue  # RR 0; no pair for AUC
        positive = masked[user, positive_rows]

        # The first relevant item in the ranking: best score, lowest row among ties.
        best = positive.max()
        best_row = positive_rows[np.argmax(positive == best)]
        ahead = candidates.size - np.searchsorted(candidates, best, side="right")
        ahead += np.count_nonzero(masked[user, :best_row] == best)
        rr_sum += 1.0 / (1 + ahead)

        num_negative = candidates.size - positive.size
        if num_negative == 0:
            continue
        below = np.searchsorted(candidates, positive, side="left")
        equal = np.searchsorted(candidates, positive, side="right") - below
        positive_sorted = np.sort(positive)
        positive_below = np.searchsorted(positive_sorted, positive, side="left")
        positive_equal = np.searchsorted(positive_sorted, positive, side="right") - positive_below
        wins = np.sum(below - positive_below) + 0.5 * np.sum(equal - positive_equal)
        auc_sum += wins / (positive.size * num_negative)
        auc_users += 1
    return rr_sum, auc_sum, auc_users


def _diversity_sums(top: np.ndarray, unit_vectors: np.ndarray) -> tuple[float, int]:
    """Sum over users of their mean pairwise (1 - cosine), and users with >= 2 items."""
    listed = top >= 0
    vectors = unit_vectors[np.maximum(top, 0)] * listed[..., None]  # padding -> zero vector
    cosine = vectors @ vectors.transpose(0, 2, 1)
    upper = np.triu(np.ones((top.shape[1],) * 2, dtype=bool), 1)
    pairs = listed[:, :, None] & listed[:, None, :] & upper
    pair_counts = pairs.sum(axis=(1, 2))
    distance_sums = np.where(pairs, 1.0 - cosine, 0.0).sum(axis=(1, 2))
    has_pairs = pair_counts > 0
    return float(np.sum(distance_sums[has_pairs] / pair_counts[has_pairs])), int(has_pairs.sum())


def evaluate_scores(
    scores: Any,
    *,
    exclude: Any,
    relevant: Any,
    k: int = DEFAULT_K,
    popularity: Any = None,
    num_popularity_users: int | None = None,
    item_vectors: Any = None,
) -> RankingSums:
    """All metrics for a block of users, as mergeable sums.

    scores: [users, items]. exclude / relevant: per-user item rows (list of
    arrays or CSR-like; exclude may be None). Users without relevant items are
    skipped (counted in skipped_users). Novelty needs popularity (training users
    per item) and num_popularity_users; diversity needs item_vectors [items, d].
    Without them those sums stay empty and finalize gives NaN.
    """
    k = _check_k(k)
    scores = _score_matrix(scores)
    num_users, num_items = scores.shape
    relevant_mask = _per_user_mask(relevant, num_users, num_items, "relevant")
    excluded_mask = _per_user_mask(exclude, num_users, num_items, "exclude")
    item_novelty = _item_novelty(popularity, num_popularity_users, num_items)
    unit_vectors = _unit_vectors(item_vectors, num_items)

    evaluated = relevant_mask.any(axis=1)
    sums = RankingSums(
        k=k,
        skipped_users=int(num_users - evaluated.sum()),
        item_counts=np.zeros(num_items, dtype=np.int64),
    )
    if not evaluated.any():
        return sums
    relevant_mask, excluded_mask = relevant_mask[evaluated], excluded_mask[evaluated]
    masked = _mask_excluded(scores[evaluated], excluded_mask)
    top = _top_k(masked, k)
    listed = top >= 0

    hits = relevant_mask[np.arange(top.shape[0])[:, None], np.maximum(top, 0)] & listed
    num_hits = hits.sum(axis=1)
    num_relevant = relevant_mask.sum(axis=1)
    dcg = np.where(hits, _discounts(k), 0.0).sum(axis=1)
    ideal = _ideal_dcg(k)[np.minimum(num_relevant, k)]

    sums.users = int(top.shape[0])
    sums.recall = float(np.sum(num_hits / num_relevant))
    sums.precision = float(np.sum(num_hits / k))
    sums.ndcg = float(np.sum(dcg / ideal))
    sums.hit_users = int(np.count_nonzero(num_hits))
    sums.mrr, sums.auc, sums.auc_users = _rank_based_sums(masked, relevant_mask, excluded_mask)
    sums.item_counts = np.bincount(top[listed], minlength=num_items).astype(np.int64)
    if item_novelty is not None:
        sums.novelty = float(np.sum(item_novelty[top[listed]]))
        sums.novelty_items = int(listed.sum())
    if unit_vectors is not None:
        sums.diversity, sums.diversity_users = _diversity_sums(top, unit_vectors)
    return sums


# ---------------------------------------------------------------- reporting


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def format_table(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """Metrics as a fixed-width two-column table: names left, values right-aligned.

    Integers print as is, floats with 4 decimals, NaN as n/a.
    """
    names = [str(name) for name in metrics]
    values = [_format_value(value) for value in metrics.values()]
    name_width = max((len(name) for name in names), default=0)
    value_width = max((len(value) for value in values), default=0)
    width = max(name_width + 2 + value_width, len(title) if title else 0)
    lines = [title, "-" * width] if title else []
    lines += [
        f"{name:<{width - value_width}}{value:>{value_width}}" for name, value in zip(names, values)
    ]
    return "\n".join(lines)
