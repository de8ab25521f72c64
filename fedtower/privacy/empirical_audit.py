"""Empirical privacy audit in one training run (Steinke, Nasr and Jagielski 2023), with recommender canaries.

The ledger says what epsilon a run *claims*; this measures a lower bound on the
epsilon the trained model *shows*. m canaries, each with an item of its own
that nothing else touches, are included in the training data independently
with probability 1/2 (the secret coin flips come from `DPRandom`). After
training, a white-box auditor scores each canary from the released item towers
alone: how far the bias of the canary's item moved (a positive it was trained
on pulls its bias up). It guesses "in" for the k+ highest scores, "out" for the
k- lowest, abstains on the rest, and counts correct guesses. For an
(epsilon, delta)-DP run, the number of correct guesses out of r is dominated by
Binomial(r, e^eps / (1 + e^eps)) up to a delta term (the paper's Theorem 5.2,
its Appendix D p-value); the largest epsilon rejected at the stated confidence
is the lower bound. For an honest run it stays at or below the claimed epsilon
(but for a chance of at most 1 - confidence); a run whose noise or clipping is
broken exceeds it.

Canaries per privacy unit:
- user: a canary *user*: the canary item (its oldest interaction) and three
  popular items; the whole user is in or out.
- interaction: a canary *event*: a canary user always holds three popular
  items; only its (oldest) interaction with the canary item is in or out. Three
  background interactions keep the per-user test split unchanged by the canary
  (ceil(0.2 x 3) = ceil(0.2 x 4)).
- client (client-level DP): a canary *client*: one user as for the user unit,
  on a client of its own (see `benchmarks/privacy_audit.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from fedtower.data.schema import Catalogue, Dataset
from fedtower.privacy.secure_random import DPRandom

CANARY_PREFIX = "canary"
BACKGROUND_ITEMS = 3


# ---------------------------------------------------------------- the bound


def audit_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (epsilon, delta)-DP, m canaries (Steinke et al. 2023, App. D)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"Need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m}).")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # delta's share: 2 m delta times the largest average mass of the i values just below v.
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Bin = v-1], P[Bin = v-2], ...
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon such that v of r correct guesses would be rejected at `confidence` (0 if none)."""
    if not 0 < confidence < 1:
        raise ValueError(f"The confidence must be in (0, 1), got {confidence}.")
    p = 1.0 - confidence
    if audit_p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    low, high = 0.0, 1.0
    while audit_p_value(m, r, v, high, delta) < p:
        low, high = high, 2 * high
        if high > 100:
            return low
    for _ in range(60):  # bisection to ~1e-12 of the range
        mid = (low + high) / 2
        if audit_p_value(m, r, v, mid, delta) < p:
            low = mid
        else:
            high = mid
    return low


@dataclass
class Guesses:
    guesses: int
    correct: int
    lower_bound: float


def guess_and_bound(scores: np.ndarray, included: np.ndarray, *, k: int, delta: float,
                    confidence: float = 0.95) -> Guesses:  # fmt: skip
    """Guess "in" for the k highest scores and "out" for the k lowest; the bound of the correct guesses."""
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    m = len(scores)
    if not 0 < 2 * k <= m:
        raise ValueError(f"Need 0 < 2k <= m canaries; got k = {k}, m = {m}.")
    order = np.argsort(scores, kind="stable")
    correct = int(included[order[-k:]].sum() + (~included[order[:k]]).sum())
    return Guesses(2 * k, correct, epsilon_lower_bound(m, 2 * k, correct, delta=delta, confidence=confidence))


# ---------------------------------------------------------------- canaries


@dataclass
class Canaries:
    """The audit's data: the base data plus canaries, who is in, and which catalogue rows are theirs."""

    dataset: Dataset
    included: np.ndarray  # bool per canary: the secret coin flips
    items: list[str]  # each canary's own item
    unit: str
    notes: dict = field(default_factory=dict)


def add_canaries(base: Dataset, m: int, unit: str, *, randomness: DPRandom | None = None) -> Canaries:
    """`base` with m canary items in its catalogue and m canaries, each in with probability 1/2."""
    if unit not in ("user", "interaction", "client"):
        raise ValueError(f"Canaries are users, interactions or clients; got unit {unit!r}.")
    randomness = randomness or DPRandom()
    included = randomness.uniform(m) < 0.5
    items = [f"{CANARY_PREFIX}-{i:05d}" for i in range(m)]
    catalogue = _with_canary_items(base.catalogue, items)
    popular = base.events["item"].value_counts().index[: 50].astype(str).tolist()
    start = int(base.events["timestamp"].min()) - 10_000_000  # canary interactions are each user's oldest
    rows = []
    picks = randomness.words32(m * BACKGROUND_ITEMS) % len(popular)
    for c, item in enumerate(items):
        if unit in ("user", "client") and not included[c]:
            continue  # the whole canary user (or client) is out
        user = f"{CANARY_PREFIX}-{unit}-{c:05d}"
        background = []
        for index in picks[c * BACKGROUND_ITEMS : (c + 1) * BACKGROUND_ITEMS]:
            candidate = popular[int(index)]
            while candidate in background:  # distinct items, so each stays one interaction
                candidate = popular[(popular.index(candidate) + 1) % len(popular)]
            background.append(candidate)
        if unit != "interaction" or included[c]:
            rows.append((user, item, "purchase", start + c, np.nan))
        for j, other in enumerate(background):  # views: light positives, so the canary item dominates
            rows.append((user, other, "view", start + 1_000_000 + 100 * c + j, np.nan))
    canary_events = pd.DataFrame(rows, columns=["user", "item", "behaviour", "timestamp", "value"])
    events = pd.concat([base.events, canary_events], ignore_index=True)
    dataset = Dataset(catalogue=catalogue, events=events, name=f"{base.name}+{m} {unit} canaries")
    return Canaries(dataset, included, items, unit)


def _with_canary_items(catalogue: Catalogue, items: list[str]) -> Catalogue:
    """The catalogue plus the canary items, with no content at all (no categories, price or brand, so no
    content features either): an item tower of id embeddings and biases only, so that a canary's clipped
    gradient is not spread over a content MLP whose gradients grow as it trains."""
    ids = [*catalogue.items["item"].astype(str).tolist(), *items]
    table = pd.DataFrame({"item": ids, "title": [f"Item {i}" for i in ids], "categories": [()] * len(ids),
                          "price": np.nan, "brand": ""})  # fmt: skip
    return Catalogue(table)


def bias_scores(initial: dict, final: dict, catalogue: Catalogue, items: list[str]) -> np.ndarray:
    """How far each canary item's bias moved between two released item towers (a white-box statistic)."""
    key = "item_tower.bias.weight"
    rows = catalogue.index.rows(items)
    before, after = np.asarray(initial[key]).reshape(-1), np.asarray(final[key]).reshape(-1)
    return after[rows] - before[rows]
