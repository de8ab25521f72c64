"""The spectral DP item tower: three Gaussian releases of bounded per-user statistics, then post-processing.

DP-SGD spends its budget on hundreds of thousands of item-tower coordinates
over many steps; at a few hundred or thousand users per site the noise drowns
the signal (NDCG below a most-popular list). Here each site releases, once per
run, three sums over its users in which every user's contribution has a
stated L2 bound (the sensitivity), each with Gaussian noise of std
noise-multiplier x sensitivity, charged as one Gaussian release (q = 1, one
step) to the site's accountant:

1. histogram: a vector over the catalogue. User unit: the user's distinct
   items, divided by sqrt(their count) (L2 norm 1). Interaction unit: the
   user's distinct items (one event moves one coordinate by at most 1).
2. co-occurrence: over the head items only (chosen by the coordinator from
   the noisy histogram sum, public post-processing), the upper triangle of
   y y^T / max(|y|, floor) for the user's head-item indicator y. User unit:
   floor 1, norm <= 1. Interaction unit: one event changes it by at most
   1 / sqrt(floor) (worked out in `cooccurrence_sensitivity`).
3. selection: for each of a few public candidate weightings of the tower's
   parts, the user's NDCG@k on their own latest training items; a vector in
   [0, 1]^K, L2 norm <= sqrt(K) (one event moves it by at most the same).

The coordinator turns the sums into an item tower (all post-processing of DP
outputs and the public catalogue): the head is the items whose noisy
histogram clears `HEAD_THRESHOLD` noise stds; the co-occurrence matrix's
eigenvectors whose eigenvalues clear the noise's spectral edge 2 std sqrt(H)
(a symmetric Gaussian matrix's largest eigenvalue) become the head items'
"spectral" block; the public content features, standardised and unit-norm,
are the "content" block of every item; the non-negative noisy histogram,
divided by its maximum, is the item bias (the popularity prior). A user's
vector is their pooled history through that table with each block
normalised to unit length on the client (`TwoTowerConfig.user_blocks`), so
score = <spectral> + content weight <content> + prior weight x prior.
The weights come from the selection release: the candidate with the largest
noisy sum.

Every number here is fixed in advance (the budget shares, thresholds, floor,
candidate grid); nothing is tuned on the data a run reports. The rule was
calibrated on the synthetic generator (seed 1) and a validation split carved
from training data (notes/spectral-calibration.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedtower.data.prepared import UserHistories
from fedtower.privacy.quantization import l1_bound

# Shares of the budget (of 1 / z^2 in RDP: the three releases compose to one Gaussian of multiplier z).
SHARES = {"histogram": 0.25, "cooccurrence": 0.5, "selection": 0.25}
RELEASES = tuple(SHARES)
HEAD_THRESHOLD = 3.0  # noise stds a noisy histogram value must clear for its item to be in the head
HEAD_MIN = 20  # the head never has fewer items than this (the top ones by noisy value)
HEAD_MAX = 2000  # nor more (the co-occurrence release is H (H + 1) / 2 numbers)
SPECTRAL_EDGE = 2.0  # eigenvalues must clear SPECTRAL_EDGE x std x sqrt(H)
INTERACTION_FLOOR = 32  # interaction unit: heads-items count below which a user's matrix is not rescaled
# The candidate weightings (spectral, content, prior) the selection release scores: the two that won a
# 3 x 3 grid of (content, prior) weights in calibration (collaborative; content and popularity), and the
# DP popularity list alone, so that a federation too small for the rest falls back to popularity.
WITH_CONTENT = ((1.0, 0.0, 0.2), (1.0, 1.0, 1.0), (0.0, 0.0, 1.0))
WITHOUT_CONTENT = ((1.0, 0.0, 0.2), (1.0, 0.0, 1.0), (0.0, 0.0, 1.0))
NUM_CANDIDATES = len(WITH_CONTENT)  # the same with and without content: the secure plan is made before either
SELECTION_HOLDOUT = 0.2  # the latest 20% (at least one) of each user's training items score a candidate


def noise_multipliers(z: float) -> dict[str, float]:
    """Each release's noise multiplier, so that the three together are one Gaussian of multiplier z:
    RDP alpha / (2 z_i^2) summed over the releases is alpha / (2 z^2) exactly."""
    if not z > 0:
        raise ValueError(f"The noise multiplier must be positive, got {z}.")
    return {name: z / math.sqrt(share) for name, share in SHARES.items()}


def histogram_sensitivity(unit: str) -> float:
    _check_unit(unit)
    return 1.0


def cooccurrence_sensitivity(unit: str, *, floor: int = INTERACTION_FLOOR) -> float:
    """L2 change of the released upper triangle (diagonal included) of one user's y y^T / max(n, f), n = |y|.

    User unit (a whole user, f = 1): n diagonal and n (n - 1) / 2 off-diagonal entries of 1/n, norm
    sqrt((n + 1) / (2 n)) <= 1 (equal for n = 1). Interaction unit (one event added or removed): for
    n + 1 <= f, the new item's n + 1 entries of 1/f: sqrt(n + 1) / f <= 1 / sqrt(f), attained at n + 1 = f.
    For n >= f, the new item's n + 1 entries of 1 / (n + 1) and the old triangle rescaled from 1/n to
    1 / (n + 1) (n (n + 1) / 2 entries changed by 1 / (n (n + 1))) are disjoint: squared norm
    (2 n + 1) / (2 n (n + 1)) < 1/n <= 1/f. So 1 / sqrt(f)."""
    _check_unit(unit)
    if unit == "user":
        return 1.0
    return 1.0 / math.sqrt(floor)


def selection_sensitivity(num_candidates: int) -> float:
    return math.sqrt(num_candidates)


def sensitivity(release: str, unit: str, *, num_candidates: int = 1) -> float:
    if release == "histogram":
        return histogram_sensitivity(unit)
    if release == "cooccurrence":
        return cooccurrence_sensitivity(unit)
    if release == "selection":
        return selection_sensitivity(num_candidates)
    raise ValueError(f"Unknown spectral release {release!r}; expected one of {RELEASES}.")


def _check_unit(unit: str) -> None:
    if unit not in ("user", "interaction"):
        raise ValueError(f"The spectral item tower runs at the user or interaction level, got {unit!r}.")


# ---------------------------------------------------------------- what a site sums (before its noise)


def _distinct(histories: UserHistories, u: int) -> np.ndarray:
    return np.unique(histories.items_of(u))


def user_histogram(histories: UserHistories, num_items: int, unit: str) -> np.ndarray:
    """Sum over the site's users of each user's bounded item vector (see the module docstring)."""
    _check_unit(unit)
    total = np.zeros(num_items, dtype=np.float64)
    for u in range(len(histories)):
        items = _distinct(histories, u)
        if items.size:
            total[items] += 1.0 / math.sqrt(items.size) if unit == "user" else 1.0
    return total


def upper_size(head_size: int) -> int:
    return head_size * (head_size + 1) // 2


def user_cooccurrence(histories: UserHistories, head: np.ndarray, unit: str) -> np.ndarray:
    """Sum over the site's users of the upper triangle (row-major, diagonal included) of each user's
    y y^T / max(|y|, floor) over the head items."""
    _check_unit(unit)
    floor = 1 if unit == "user" else INTERACTION_FLOOR
    size = len(head)
    position = np.full(int(head.max()) + 1 if size else 1, -1, dtype=np.int64)
    position[head] = np.arange(size)
    matrix = np.zeros((size, size), dtype=np.float64)
    for u in range(len(histories)):
        items = _distinct(histories, u)
        items = items[items < len(position)]
        rows = position[items]
        rows = rows[rows >= 0]
        if rows.size:
            matrix[np.ix_(rows, rows)] += 1.0 / max(rows.size, floor)
    return matrix[np.triu_indices(size)]


def symmetric_from_upper(upper: np.ndarray, size: int) -> np.ndarray:
    if upper.shape != (upper_size(size),):
        raise ValueError(f"An upper triangle of a {size} x {size} matrix has {upper_size(size)} numbers, "
                         f"got {upper.shape}.")  # fmt: skip
    matrix = np.zeros((size, size), dtype=np.float64)
    matrix[np.triu_indices(size)] = upper
    return matrix + np.triu(matrix, 1).T


# ---------------------------------------------------------------- the coordinator's post-processing


def choose_head(histogram: np.ndarray, noise_std: float) -> np.ndarray:
    """Item rows of the head, most popular first: noisy value > HEAD_THRESHOLD x the sum's noise std,
    at least HEAD_MIN and at most HEAD_MAX of them."""
    order = np.argsort(-histogram, kind="stable")
    clear = int((histogram > HEAD_THRESHOLD * noise_std).sum())
    size = min(len(histogram), max(HEAD_MIN, min(clear, HEAD_MAX)))
    return order[:size].astype(np.int64)


def spectral_vectors(matrix: np.ndarray, noise_std: float, *, max_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The eigenvectors (H x k) and eigenvalues (k) of the noisy co-occurrence matrix above the noise's
    spectral edge, at most `max_rank` and at least one."""
    values, vectors = np.linalg.eigh(matrix)
    order = np.argsort(-values)
    values, vectors = values[order], vectors[:, order]
    edge = SPECTRAL_EDGE * noise_std * math.sqrt(len(matrix))
    rank = max(1, min(max_rank, int((values > edge).sum())))
    return vectors[:, :rank], values[:rank]


def content_block(features: np.ndarray | None, num_items: int) -> np.ndarray:
    """Public content, each column standardised, each row of unit length (N x F; N x 0 without content)."""
    if features is None or features.shape[1] == 0:
        return np.zeros((num_items, 0))
    features = np.asarray(features, dtype=np.float64)
    features = (features - features.mean(0)) / np.maximum(features.std(0), 1e-9)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def popularity_prior(histogram: np.ndarray) -> np.ndarray:
    top = float(np.max(histogram)) if histogram.size else 0.0
    return np.maximum(histogram, 0.0) / top if top > 0 else np.zeros_like(histogram)


@dataclass(frozen=True)
class SpectralLayout:
    """Where the blocks sit in an item vector of width `dim`: spectral first, then content."""

    dim: int
    content_dim: int

    def __post_init__(self) -> None:
        if self.spectral_dim < 1:
            raise ValueError(f"dim = {self.dim} leaves no room for a spectral block next to {self.content_dim} "
                             "content features; raise dim.")  # fmt: skip

    @property
    def spectral_dim(self) -> int:
        return self.dim - self.content_dim

    @property
    def blocks(self) -> tuple[int, ...]:
        return (self.spectral_dim, self.content_dim) if self.content_dim else (self.dim,)

    def candidates(self) -> tuple[tuple[float, float, float], ...]:
        """The public (spectral, content, prior) weightings the selection release scores."""
        return WITH_CONTENT if self.content_dim else WITHOUT_CONTENT


def item_tower_arrays(layout: SpectralLayout, *, num_items: int, head: np.ndarray, vectors: np.ndarray,
                      content: np.ndarray, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The id table (N x dim) and bias (N x 1) of the spectral item tower, every weight 1."""
    if len(head) != vectors.shape[0]:
        raise ValueError(f"{len(head)} head items but {vectors.shape[0]} rows of spectral vectors.")
    table = np.zeros((num_items, layout.dim), dtype=np.float32)
    rank = min(vectors.shape[1], layout.spectral_dim)
    table[head, :rank] = vectors[:, :rank]
    if layout.content_dim:
        table[:, layout.spectral_dim :] = content
    return table, prior.astype(np.float32).reshape(-1, 1)


def reweighted(layout: SpectralLayout, table: np.ndarray, bias: np.ndarray,
               weights: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A tower built with every weight 1, rescaled to (spectral, content, prior) `weights`. The user vector's
    blocks are unit length whatever the scale, so a block's weight is its share of the score."""
    spectral, content, prior = weights
    table = table.copy()
    table[:, : layout.spectral_dim] *= spectral
    table[:, layout.spectral_dim :] *= content
    return table, (bias * prior).astype(np.float32)


def selection_split(histories: UserHistories) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each user's training items without their latest SELECTION_HOLDOUT share, and that share
    (users with a single item hold nothing out and score 0 for every candidate)."""
    kept, held = [], []
    for u in range(len(histories)):
        items = histories.items_of(u)
        out = max(1, math.ceil(SELECTION_HOLDOUT * len(items))) if len(items) > 1 else 0
        kept.append(items[: len(items) - out])
        held.append(items[len(items) - out :])
    return kept, held


# ---------------------------------------------------------------- under secure aggregation (federation-wide)


def release_lengths(*, num_items: int, num_candidates: int) -> dict[str, int]:
    """The longest each release can be (public: the catalogue, HEAD_MAX and the candidate grid); they set
    the L1 bounds of the quantized releases."""
    return {"histogram": num_items, "cooccurrence": upper_size(min(num_items, HEAD_MAX)), "selection": num_candidates}


def secure_entries(z: float, *, l2_units: int, num_items: int, num_candidates: int) -> dict[str, list]:
    """Each release's accountant entry under secure aggregation: one Skellam step (q = 1) of its share's
    multiplier, L2 bound l2_units and the L1 bound of an integer vector of its longest length."""
    lengths = release_lengths(num_items=num_items, num_candidates=num_candidates)
    return {name: ["skellam", zr, 1.0, 1, int(l2_units), l1_bound(int(l2_units), lengths[name])]
            for name, zr in noise_multipliers(z).items()}  # fmt: skip


def secure_noise_multiplier(*, target_epsilon: float, delta: float, l2_units: int, num_items: int,
                            num_candidates: int, fixed: list | tuple = ()) -> float:  # fmt: skip
    """The smallest z (relative 1e-6) whose three Skellam releases, after `fixed`, stay within the target.
    A deterministic bisection: every site computes the same z from the same public numbers."""
    from fedtower.privacy.accounting import ClientAccountant  # here: accounting imports nothing of this module

    accountant = ClientAccountant(fixed)

    def epsilon(z: float) -> float:
        entries = secure_entries(z, l2_units=l2_units, num_items=num_items, num_candidates=num_candidates)
        return accountant.epsilon_with(list(entries.values()), delta=delta)

    low, high = 1e-3, 1e4
    if epsilon(high) > target_epsilon:
        raise ValueError(f"No noise multiplier up to {high:g} keeps the spectral releases within epsilon = "
                         f"{target_epsilon} at delta = {delta}.")  # fmt: skip
    while high / low > 1 + 1e-6:
        middle = math.sqrt(low * high)
        low, high = (middle, high) if epsilon(middle) > target_epsilon else (low, middle)
    return high


def per_user_entries(release: str, histories: UserHistories, *, unit: str, head: np.ndarray | None = None,
                     per_user: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(user, coordinate, value) of every non-zero entry of each user's contribution to `release`, each pair
    once: what `user_histogram` / `user_cooccurrence` sum, or the rows of `per_user` (users x K) for the
    selection. Values are in the release's own units (a user's vector has L2 norm <= its sensitivity)."""
    _check_unit(unit)
    users, coords, values = [], [], []
    if release == "selection":
        rows, columns = np.nonzero(per_user)
        return rows.astype(np.int64), columns.astype(np.int64), per_user[rows, columns].astype(np.float64)
    if release == "cooccurrence":
        size = len(head)
        position = np.full(int(head.max()) + 1, -1, dtype=np.int64)
        position[head] = np.arange(size)
        floor = 1 if unit == "user" else INTERACTION_FLOOR
    for u in range(len(histories)):
        items = _distinct(histories, u)
        if release == "histogram":
            if items.size:
                users.append(np.full(items.size, u))
                coords.append(items)
                values.append(np.full(items.size, 1.0 / math.sqrt(items.size) if unit == "user" else 1.0))
            continue
        rows = position[items[items < len(position)]]
        rows = np.sort(rows[rows >= 0])
        if not rows.size:
            continue
        i, j = np.triu_indices(rows.size)
        a, b = rows[i], rows[j]  # a <= b: row-major upper-triangle index of (a, b)
        users.append(np.full(a.size, u))
        coords.append(a * size - a * (a - 1) // 2 + (b - a))
        values.append(np.full(a.size, 1.0 / max(rows.size, floor)))
    if not users:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0)
    return np.concatenate(users).astype(np.int64), np.concatenate(coords).astype(np.int64), np.concatenate(values)
