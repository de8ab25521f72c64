"""The item table as served: fp32, fp16 or int8 with per-row scales, and exact top-k.

int8 keeps one scale per item row (max |value| / 127), so every element is
off by at most half a scale step. It is scored with torch's int8 weight-only
matmul kernel (the user vector in bfloat16), which reads a quarter of the
fp32 bytes: scoring a large catalogue is memory-bound, so that is the win.
fp16 halves what is shipped and stored; it is scored as fp32 after loading
(CPUs have no fast fp16 matrix-vector product).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedtower.serving.index import CandidateIndex, resolve_kind
from fedtower.serving.types import TableOptions

TOPK_BLOCK = 1024  # items per block in the two-stage top-k


@dataclass
class QuantizedRows:
    """int8 rows with one float32 scale each: value ~= q * scale."""

    q: np.ndarray  # int8 [N, d]
    scale: np.ndarray  # float32 [N]

    @classmethod
    def from_vectors(cls, vectors: np.ndarray) -> QuantizedRows:
        vectors = np.asarray(vectors, dtype=np.float32)
        peak = np.abs(vectors).max(axis=1)
        scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)  # zero rows stay exactly 0
        q = np.clip(np.rint(vectors / scale[:, None]), -127, 127).astype(np.int8)
        return cls(q, scale)

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.scale[:, None]

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.scale.nbytes)


class ItemTable:
    """Item vectors and biases, scored against one user vector at a time.

    With an approximate index (`self.index`, see fedtower.serving.index) the
    Recommender asks it for candidates and re-scores those with `scores_of`;
    `scores` always scores the whole table.
    """

    def __init__(self, vectors: np.ndarray, bias: np.ndarray, options: TableOptions | str = "fp32"):
        options = TableOptions(precision=options) if isinstance(options, str) else options
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.options = options
        precision = self.precision = options.precision
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)
        self.num_items, self.dim = vectors.shape
        self._int8 = None
        if precision == "int8":
            rows = QuantizedRows.from_vectors(vectors)
            self.quantized = rows
            self.vectors = rows.dequantize()  # what this table means, for explanations and updates
            self._int8 = _Int8Kernel.build(rows)
        elif precision == "fp16":
            self.half = vectors.astype(np.float16)
            self.vectors = self.half.astype(np.float32)
        else:
            self.vectors = vectors
        self.index: CandidateIndex | None = None
        if resolve_kind(options.index, self.num_items) == "ivf":
            # Over what the table means (int8: the dequantized rows), so candidates match the exact scores.
            self.index = CandidateIndex(self.vectors, self.bias, lists=options.index_lists or None,
                                        probes=options.index_probes)  # fmt: skip

    @property
    def nbytes(self) -> int:
        """Bytes of the table as shipped and held for scoring (vectors, scales, bias)."""
        if self.precision == "int8":
            return self.quantized.nbytes + self.bias.nbytes
        if self.precision == "fp16":
            return int(self.half.nbytes + self.bias.nbytes)
        return int(self.vectors.nbytes + self.bias.nbytes)

    def scores(self, user: np.ndarray) -> np.ndarray:
        """<user, item> + bias for every item (float32 [N], a fresh array the caller may modify)."""
        if self._int8 is not None:
            scores = self._int8.scores(user)
        else:
            scores = self.vectors @ np.asarray(user, dtype=np.float32)
        scores += self.bias  # in place: no second catalogue-sized array
        return scores

    def scores_of(self, rows: np.ndarray, user: np.ndarray) -> np.ndarray:
        """<user, item> + bias for these rows only, from the rows the table means (float32 [len(rows)])."""
        return self.vectors[rows] @ np.asarray(user, dtype=np.float32) + self.bias[rows]


class _Int8Kernel:
    """torch's int8 weight-only matmul (per-row scales); None where it is missing or misbehaves.

    The kernel mis-handles (NaN, or crashes on) row widths that are not a
    multiple of 16, so rows are zero-padded to one: zeros add nothing to a dot
    product. At build it is checked against the dequantized table on a probe
    vector, and refused when it disagrees.
    """

    WIDTH = 16

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dim: int):
        self.q, self.scale, self.dim = q, scale, dim

    @classmethod
    def build(cls, rows: QuantizedRows) -> _Int8Kernel | None:
        if getattr(torch, "_weight_int8pack_mm", None) is None:
            return None
        n, dim = rows.q.shape
        padded = np.zeros((n, -(-dim // cls.WIDTH) * cls.WIDTH), dtype=np.int8)
        padded[:, :dim] = rows.q
        kernel = cls(torch.from_numpy(padded), torch.from_numpy(rows.scale).to(torch.bfloat16), dim)
        probe = np.random.default_rng(0).normal(size=dim).astype(np.float32)
        sample = slice(0, min(n, 4096))
        try:
            got = kernel.scores(probe)[sample]
        except RuntimeError:
            return None
        exact = rows.dequantize()[sample] @ probe
        # bfloat16 input and output: a few parts in 2^8 of the magnitudes involved.
        tolerance = 2**-6 * (np.abs(rows.dequantize()[sample]) @ np.abs(probe)) + 1e-6
        if not np.all(np.abs(got - exact) <= tolerance):
            return None
        return kernel

    def scores(self, user: np.ndarray) -> np.ndarray:
        x = torch.zeros(1, self.q.shape[1], dtype=torch.bfloat16)
        x[0, : self.dim] = torch.from_numpy(np.asarray(user, dtype=np.float32))
        with torch.no_grad():
            return torch._weight_int8pack_mm(x, self.q, self.scale).float().numpy()[0]


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k best finite scores, best first (ties: lower row first).

    Two stages, exact: every one of the k best items lies in one of the k
    blocks with the highest maxima (a block holding the j-th best item has a
    maximum at least that good, and at most k blocks can beat the k-th best),
    so only k blocks are searched after one pass of block maxima.
    """
    n = scores.shape[0]
    if k <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    if n <= 4 * TOPK_BLOCK or k * TOPK_BLOCK * 4 > n:
        candidates = np.arange(n)
    else:
        blocks = n // TOPK_BLOCK
        head = scores[: blocks * TOPK_BLOCK].reshape(blocks, TOPK_BLOCK).max(axis=1)
        best_blocks = np.argpartition(-head, k - 1)[:k]
        # Include ties with the k-th block maximum, and the ragged tail.
        best_blocks = np.flatnonzero(head >= head[best_blocks].min())
        starts = best_blocks * TOPK_BLOCK
        candidates = (starts[:, None] + np.arange(TOPK_BLOCK)).ravel()
        candidates = np.concatenate([candidates, np.arange(blocks * TOPK_BLOCK, n)])
    values = scores[candidates]
    finite = np.isfinite(values)
    candidates, values = candidates[finite], values[finite]
    if candidates.size > k:
        keep = np.argpartition(-values, k - 1)[:k]
        threshold = values[keep].min()
        keep = np.flatnonzero(values >= threshold)  # ties at the cut: the lower rows win below
        candidates, values = candidates[keep], values[keep]
    order = np.lexsort((candidates, -values))[:k]
    return candidates[order].astype(np.int64)
