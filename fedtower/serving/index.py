"""Approximate candidate retrieval for large catalogues: an IVF index (faiss) over the served table.

A score is <user, v_i> + w * b_i (w = 1 - novelty), a maximum inner product
search. It is turned into a nearest-neighbour search in L2, where inverted
lists work well (Bachrach et al. 2014): item x_i = [v_i, b_i, sqrt(R^2 - |[v_i, b_i]|^2)],
query q = [u, w, 0], so |q - x_i|^2 = |q|^2 + R^2 - 2 * score_i and the
nearest items are the best scored ones, for any query and any novelty weight.

The index only proposes candidates. The Recommender re-scores them exactly
against the served table and applies exclusions, filters and re-ranking to the
exact scores, so what it returns is exact on the candidates; what an index can
miss is an item it never proposed (recall, measured by
benchmarks/serving_latency.py on a trained table).

Built from the served item table at load and at each hot reload, off the
request path (fedtower.serving.sync builds it beside the old table). Nothing
here leaves the node: the table is the released item tower plus this node's
own local items.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from fedtower.serving.types import INDEX_KINDS

log = logging.getLogger("fedtower.serving")

# Below this many items `auto` scores the whole table: exact int8/fp32 scoring stays under ~1.5 ms p99 on
# one thread up to here, and an index would cost build time and memory for little (serving_latency.py).
AUTO_MIN_ITEMS = 200_000
TRAIN_POINTS_PER_LIST = 40  # k-means sample per list (faiss warns below 39)
TRAIN_ITERATIONS = 10


def faiss_module():
    """faiss, or None where it is not installed (the exact path then serves everything)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def default_lists(num_items: int) -> int:
    """Inverted lists: about 4 sqrt(N), a power of two (4096 at 10^6 items, 1024 at 10^5)."""
    return max(1, 2 ** round(math.log2(4 * math.sqrt(max(num_items, 1)))))


def resolve_kind(kind: str, num_items: int) -> str:
    """"exact" or "ivf" for a table of `num_items` rows (`auto` picks by size and by whether faiss loads)."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index must be one of {', '.join(INDEX_KINDS)}, got {kind!r}.")
    if kind == "exact" or (kind == "auto" and num_items < AUTO_MIN_ITEMS):
        return "exact"
    if faiss_module() is None:
        if kind == "ivf":
            raise ValueError("index 'ivf' needs faiss: pip install faiss-cpu (or choose index 'exact').")
        log.warning("faiss is not installed: serving %d items by exact scoring (pip install faiss-cpu "
                    "for the approximate index).", num_items)  # fmt: skip
        return "exact"
    return "ivf"


@dataclass
class IndexStats:
    """What building cost, for status() and the benchmarks."""

    kind: str
    items: int
    lists: int
    probes: int
    build_seconds: float
    nbytes: int

    def to_dict(self) -> dict:
        return {"kind": self.kind, "items": self.items, "lists": self.lists, "probes": self.probes,
                "build_seconds": round(self.build_seconds, 3), "mib": round(self.nbytes / 2**20, 1)}  # fmt: skip


class CandidateIndex:
    """Inverted lists over the served table; `candidates(user, bias_weight, n)` proposes rows."""

    def __init__(self, vectors: np.ndarray, bias: np.ndarray, *, lists: int | None = None, probes: int = 64,
                 seed: int = 0):  # fmt: skip
        faiss = faiss_module()
        if faiss is None:
            raise ValueError("The approximate index needs faiss: pip install faiss-cpu.")
        num_items, dim = vectors.shape
        if num_items == 0:
            raise ValueError("The approximate index needs at least one item.")
        if probes < 1:
            raise ValueError(f"index probes must be at least 1, got {probes}.")
        started = time.perf_counter()
        scored = np.hstack([vectors, bias[:, None]]).astype(np.float32)  # [N, d + 1]
        squared = np.einsum("ij,ij->i", scored, scored)
        lift = np.sqrt(np.maximum(squared.max() - squared, 0.0)).astype(np.float32)
        points = np.ascontiguousarray(np.hstack([scored, lift[:, None]]))  # [N, d + 2], all of norm R
        del scored
        # Automatic lists: no more than the items can train (39 per list, faiss's floor).
        self.lists = lists or max(1, min(default_lists(num_items), num_items // 39))
        self.lists = min(self.lists, num_items)
        self.probes = min(probes, self.lists)
        self.dim = dim
        quantizer = faiss.IndexFlatL2(dim + 2)
        index = faiss.IndexIVFFlat(quantizer, dim + 2, self.lists, faiss.METRIC_L2)
        index.cp.niter = TRAIN_ITERATIONS
        index.cp.seed = seed
        # Centroids from a sample; the catalogue is public to the node, so a fixed seed hides nothing.
        sample_size = min(num_items, TRAIN_POINTS_PER_LIST * self.lists)
        sample = np.random.default_rng(seed).choice(num_items, sample_size, replace=False)
        index.train(points[np.sort(sample)])
        index.add(points)
        index.nprobe = self.probes
        self._index, self._quantizer, self._faiss = index, quantizer, faiss  # the quantizer must outlive the index
        self.stats = IndexStats(kind="ivf", items=num_items, lists=self.lists, probes=self.probes,
                                build_seconds=time.perf_counter() - started,
                                nbytes=int(points.nbytes + self.lists * (dim + 2) * 4 + num_items * 8))  # fmt: skip

    @property
    def num_items(self) -> int:
        return self.stats.items

    def candidates(self, user: np.ndarray, bias_weight: float, n: int, *, probes: int | None = None) -> np.ndarray:
        """Up to n rows the index ranks best for <user, v> + bias_weight * b (int64, best first).

        Fewer than n come back when the probed lists hold fewer items. `probes`: lists searched
        (default: the index's own setting).
        """
        query = np.zeros((1, self.dim + 2), dtype=np.float32)
        query[0, : self.dim] = user
        query[0, self.dim] = bias_weight
        params = self._faiss.SearchParametersIVF(nprobe=int(min(probes or self.probes, self.lists)))
        _, rows = self._index.search(query, int(min(n, self.num_items)), params=params)
        rows = rows[0]
        return rows[rows >= 0].astype(np.int64)
