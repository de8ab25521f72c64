"""Re-ranking a candidate list: diversity (MMR), category caps.

Both work on a short candidate list (best first) that plain scoring gave.
Novelty is not here: it is a change of the score itself (a popularity
penalty from the released item bias), applied before candidates are drawn.
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def mmr(candidates: np.ndarray, relevance: np.ndarray, unit_vectors: np.ndarray, k: int,
        diversity: float) -> np.ndarray:  # fmt: skip
    """Maximal marginal relevance: pick, one at a time, the candidate maximising

        (1 - diversity) * rel(i) - diversity * max_{j picked} cos(i, j)

    with rel min-max scaled to [0, 1] over the candidates (so the weight trades
    comparable quantities). diversity = 0 keeps the relevance order; ties go to
    the earlier candidate. `unit_vectors` are the candidates' unit item vectors.
    """
    if not 0.0 <= diversity <= 1.0:
        raise ValueError(f"diversity must be between 0 and 1, got {diversity}.")
    n = len(candidates)
    if n == 0 or diversity == 0.0:
        return candidates[:k]
    spread = relevance.max() - relevance.min()
    rel = (relevance - relevance.min()) / spread if spread > 0 else np.ones(n)
    max_sim = np.full(n, -np.inf)  # nothing picked yet: no redundancy term
    free = np.ones(n, dtype=bool)
    picked: list[int] = []
    for _ in range(min(k, n)):
        redundancy = np.where(np.isfinite(max_sim), max_sim, 0.0)
        value = np.where(free, (1 - diversity) * rel - diversity * redundancy, -np.inf)
        best = int(np.argmax(value))
        picked.append(best)
        free[best] = False
        max_sim = np.maximum(max_sim, unit_vectors @ unit_vectors[best])
    return candidates[picked]


def cap_categories(ordered: np.ndarray, categories: list[tuple[str, ...]], cap: int, k: int) -> np.ndarray:
    """The first k items of `ordered` such that no category holds more than `cap` of them.

    An item in several categories counts towards each and is skipped when any
    of them is full; items without a category are never capped.
    """
    if cap < 1:
        raise ValueError(f"category_cap must be at least 1, got {cap}.")
    used: Counter[str] = Counter()
    kept = []
    for row in ordered:
        cats = categories[int(row)]
        if any(used[c] >= cap for c in cats):
            continue
        used.update(cats)
        kept.append(int(row))
        if len(kept) == k:
            break
    return np.asarray(kept, dtype=np.int64)
