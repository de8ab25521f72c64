"""The user vector in NumPy, exactly as UserTower computes it, and its local refit.

user = sum_j a_j * h_j + free, where h_j are the vectors of the user's most
recent history items and a_j their pooling weights (recency weights, or
attention over them). So score(item) = sum_j a_j <h_j, v_item> + <free, v_item>
+ bias: each history item's share of a score is exact, which is what
explanations report.
"""

from __future__ import annotations

import math

import numpy as np


def recency_weights(length: int, recency: float) -> np.ndarray:
    """Normalised weights of `length` items, oldest first (as two_tower.recency_weights)."""
    if length == 0:
        return np.zeros(0, dtype=np.float32)
    position = np.arange(length, dtype=np.float64)
    raw = np.exp(recency * (position - (length - 1)) / length)
    return (raw / raw.sum()).astype(np.float32)


def pooling_weights(
    history_vectors: np.ndarray, free: np.ndarray, *, recency: float, pooling: str
) -> np.ndarray:
    """a_j for each history row (oldest first)."""
    weights = recency_weights(len(history_vectors), recency)
    if pooling != "attention" or len(history_vectors) == 0:
        return weights
    query = weights @ history_vectors + free
    logits = history_vectors @ query / math.sqrt(query.shape[-1])
    attention = np.exp(logits - logits.max())
    return (attention / attention.sum()).astype(np.float32)


def user_vector(
    history_vectors: np.ndarray, free: np.ndarray, *, recency: float, pooling: str,
    blocks: tuple[int, ...] = (),
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(user vector, pooling weights). With `blocks` (TwoTowerConfig.user_blocks) each block of the pooled
    vector is scaled to unit length, and the weights carry each block's scale only approximately (they are
    the recency weights; explanations rank history items by them)."""
    weights = pooling_weights(history_vectors, free, recency=recency, pooling=pooling)
    pooled = weights @ history_vectors if len(history_vectors) else np.zeros_like(free)
    if blocks:
        pooled = unit_blocks(pooled, blocks)
    return (pooled + free).astype(np.float32), weights


def unit_blocks(vector: np.ndarray, widths: tuple[int, ...]) -> np.ndarray:
    """Each block of columns scaled to unit L2 norm; an all-zero block stays zero (as two_tower.unit_blocks)."""
    parts = np.split(np.asarray(vector, dtype=np.float64), np.cumsum(widths)[:-1])
    return np.concatenate([p / max(float(np.linalg.norm(p)), 1e-12) for p in parts])


def refit_free(
    free: np.ndarray,
    pooled: np.ndarray,
    item_vectors: np.ndarray,
    bias: np.ndarray,
    targets: np.ndarray,
    target_weights: np.ndarray,
    *,
    steps: int,
    lr: float,
    l2: float,
    sample: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """A few gradient steps on the user's own free vector; the item tower stays frozen.

    Loss (as in training, per unit of target weight): softmax cross-entropy of
    the user's interactions over the whole catalogue, plus l2 * |free|^2 / 2.
    Its gradient is V^T (p - t / sum t) + l2 * free with p = softmax(V u + b).

    With `sample` > 0 and a catalogue over 4 x sample items, each step uses the
    user's items plus `sample` uniformly drawn items, whose logits get + log(N /
    sample) so that they stand for the whole catalogue in the softmax's
    normaliser (sampled softmax): milliseconds at 10^6 items instead of a
    full pass over the table per step.
    """
    free = free.astype(np.float64)
    total = float(target_weights.sum())
    if total <= 0 or steps == 0:
        return free.astype(np.float32)
    n = len(item_vectors)
    sampled = 0 < sample and 4 * sample < n
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        user = (pooled + free).astype(np.float32)
        if sampled:
            rows = np.concatenate([targets, rng.integers(0, n, sample)])
            vectors = item_vectors[rows]
            logits = (vectors @ user + bias[rows]).astype(np.float64)
            logits[len(targets) :] += math.log(n / sample)
            at_targets = np.arange(len(targets))
        else:
            vectors = item_vectors
            logits = (vectors @ user + bias).astype(np.float64)
            at_targets = targets
        p = np.exp(logits - logits.max())
        p /= p.sum()
        np.add.at(p, at_targets, -target_weights / total)
        gradient = vectors.T @ p.astype(np.float32) + l2 * free
        free = free - lr * gradient
    return free.astype(np.float32)


def softmax_loss(user: np.ndarray, item_vectors: np.ndarray, bias: np.ndarray, targets: np.ndarray,
                 target_weights: np.ndarray) -> float:  # fmt: skip
    """Per-unit-weight softmax cross-entropy of the user's interactions (what refit_free lowers)."""
    logits = (item_vectors @ user + bias).astype(np.float64)
    log_norm = logits.max() + np.log(np.exp(logits - logits.max()).sum())
    return float(-(target_weights * (logits[targets] - log_norm)).sum() / target_weights.sum())
