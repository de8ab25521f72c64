"""The coordinator's side of the spectral DP item tower (run config dp-mechanism = "spectral").

`SpectralItemTower` extends Flower's FedAvg (node sampling, evaluation,
Flower's round loop) and replaces what a round releases: round 1 asks every
site for its noisy item histogram, round 2 for its noisy co-occurrence
matrix of the head items, round 3 for its noisy scores of the candidate
weightings. It sums the sites' releases (the noise of a sum is the root sum
of the sites' variances, which they report) and builds the tower from the
sums and the public catalogue (fedtower.privacy.spectral), all
post-processing: the coordinator never sees anything but noisy sums.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtower.client.spectral_round import (
    BIAS_KEY,
    CANDIDATES_KEY,
    HEAD_KEY,
    ID_KEY,
    NOISE_STD_KEY,
    RELEASE_KEY,
    VECTOR_KEY,
)
from fedtower.privacy.spectral import (
    RELEASES,
    SpectralLayout,
    choose_head,
    item_tower_arrays,
    popularity_prior,
    reweighted,
    sensitivity,
    spectral_vectors,
    symmetric_from_upper,
    upper_size,
)
from fedtower.strategies.secure_dp import SecureDPStep

log = logging.getLogger("fedtower.server")


class SpectralBuilder:
    """What the coordinator holds between the three releases, and the tower it builds from their sums."""

    def __init__(self, *, layout: SpectralLayout, num_items: int, content: np.ndarray) -> None:
        if num_items < 1:
            raise ValueError(f"The catalogue must hold at least one item, got {num_items}.")
        if content.shape != (num_items, layout.content_dim):
            raise ValueError(f"The content block must be {num_items} x {layout.content_dim}, got {content.shape}.")
        self.layout, self.num_items, self.content = layout, num_items, content
        self.candidates = layout.candidates()
        self.histogram: np.ndarray | None = None
        self.head: np.ndarray | None = None
        self.table: np.ndarray | None = None  # every weight 1, before the selection
        self.bias: np.ndarray | None = None
        self.rank = 0
        self.choice: int | None = None
        self.selection: np.ndarray | None = None
        self.noise_std: dict[str, float] = {}
        self.sites: dict[str, int] = {}

    @staticmethod
    def release_of(server_round: int) -> str:
        if not 1 <= server_round <= len(RELEASES):
            raise ValueError(f"The spectral tower is built in rounds 1 to {len(RELEASES)}, not {server_round}.")
        return RELEASES[server_round - 1]

    def request(self, release: str, arrays: ArrayRecord) -> tuple[dict, ArrayRecord] | None:
        """The config keys (and arrays) that ask the sites for `release`; None when its input is missing."""
        extra: dict = {RELEASE_KEY: release}
        if release == "cooccurrence":
            if self.head is None:
                return None
            extra[HEAD_KEY] = [int(i) for i in self.head]
        elif release == "selection":
            if self.table is None:
                return None
            arrays = tower_arrays(self.table, self.bias)
            extra[CANDIDATES_KEY] = [float(w) for weights in self.candidates for w in weights]
        return extra, arrays

    def vector_length(self, release: str) -> int:
        if release == "histogram":
            return self.num_items
        if release == "cooccurrence":
            return upper_size(len(self.head))
        return len(self.candidates)

    def absorb(self, server_round: int, release: str, total: np.ndarray, noise_std: float,
               sites: int) -> tuple[ArrayRecord | None, MetricRecord]:  # fmt: skip
        """Take the noisy sum of `sites` sites' releases; returns the tower to serve now (None: unchanged)."""
        self.noise_std[release], self.sites[release] = noise_std, sites
        if release == "histogram":
            self.histogram = total
            self.head = choose_head(total, noise_std)
            log.info("Round %d: noisy histogram of %d site(s) (noise std %.3g); head of %d items.", server_round,
                     sites, noise_std, len(self.head))  # fmt: skip
            return None, MetricRecord({"spectral-sites": sites, "spectral-head": len(self.head)})
        if release == "cooccurrence":
            matrix = symmetric_from_upper(total, len(self.head))
            vectors, _ = spectral_vectors(matrix, noise_std, max_rank=self.layout.spectral_dim)
            self.rank = vectors.shape[1]
            self.table, self.bias = item_tower_arrays(self.layout, num_items=self.num_items, head=self.head,
                                                      vectors=vectors, content=self.content,
                                                      prior=popularity_prior(self.histogram))  # fmt: skip
            log.info("Round %d: noisy co-occurrence of %d site(s) (noise std %.3g); %d eigenvector(s) above the "
                     "noise edge.", server_round, sites, noise_std, self.rank)  # fmt: skip
            # Until the selection, the tower a run would serve is the first (collaborative) weighting.
            arrays = tower_arrays(*reweighted(self.layout, self.table, self.bias, self.candidates[0]))
            return arrays, MetricRecord({"spectral-sites": sites, "spectral-rank": self.rank})
        self.selection = total
        self.choice = int(np.argmax(total))
        log.info("Round %d: noisy selection sums %s; weighting %s chosen.", server_round,
                 np.round(total, 2).tolist(), self.candidates[self.choice])  # fmt: skip
        arrays = tower_arrays(*reweighted(self.layout, self.table, self.bias, self.candidates[self.choice]))
        return arrays, MetricRecord({"spectral-sites": sites, "spectral-choice": self.choice})

    def checkpoint_state(self) -> dict[str, np.ndarray]:
        state = {}
        for name in ("histogram", "head", "table", "bias", "selection"):
            value = getattr(self, name)
            if value is not None:
                state[f"spectral/{name}"] = np.asarray(value)
        state["spectral/rank"] = np.asarray(self.rank)
        return state

    def load_checkpoint_state(self, state: dict[str, np.ndarray]) -> None:
        for name in ("histogram", "head", "table", "bias", "selection"):
            if f"spectral/{name}" in state:
                setattr(self, name, np.asarray(state[f"spectral/{name}"]))
        if "spectral/rank" in state:
            self.rank = int(state["spectral/rank"])
        if self.selection is not None:
            self.choice = int(np.argmax(self.selection))

    def report(self, mode: str) -> str:
        """What the tower was built from, for the run summary."""
        lines = [f"Item tower: spectral DP (dp-mechanism = spectral; {mode})"]
        for release in RELEASES:
            if release in self.noise_std:
                std = self.noise_std[release]
                lines.append(f"  {release}: sum of {self.sites[release]} site(s), noise std {std:.4g}")
        if self.head is not None:
            lines.append(f"  head: {len(self.head)} of {self.num_items} items; spectral rank {self.rank}")
        if self.choice is not None:
            names = ("collaborative", "content and popularity" if self.layout.content_dim else "collaborative and "
                     "popularity", "DP popularity alone")  # fmt: skip
            sums = ", ".join(f"{names[i]} {v:.1f}" for i, v in enumerate(self.selection))
            chosen = f"{names[self.choice]} {self.candidates[self.choice]}"
            lines.append(f"  weighting chosen: {chosen} (noisy sums: {sums})")
        return "\n".join(lines)


def tower_arrays(table: np.ndarray, bias: np.ndarray) -> ArrayRecord:
    return ArrayRecord({ID_KEY: Array(np.ascontiguousarray(table, dtype=np.float32)),
                        BIAS_KEY: Array(np.ascontiguousarray(bias, dtype=np.float32))})  # fmt: skip


class SpectralItemTower(FedAvg):
    """Three rounds of summed per-site DP releases, then the item tower built from them."""

    checks_replies = True  # replies are noisy statistics, not item towers: validated here

    def __init__(self, *, builder: SpectralBuilder, min_train_nodes: int = 1, min_available_nodes: int = 1,
                 fraction_evaluate: float = 1.0, min_evaluate_nodes: int = 1) -> None:  # fmt: skip
        super().__init__(fraction_train=1.0, fraction_evaluate=fraction_evaluate, min_train_nodes=min_train_nodes,
                         min_evaluate_nodes=min_evaluate_nodes, min_available_nodes=min_available_nodes)  # fmt: skip
        self.builder = builder

    def summary(self) -> None:
        log.info("SpectralItemTower: a DP item tower from three Gaussian releases per site (histogram, "
                 "co-occurrence of the head items, choice among %d weightings)",
                 len(self.builder.candidates))  # fmt: skip
        layout = self.builder.layout
        log.info("  item vectors: %d spectral + %d content dims", layout.spectral_dim, layout.content_dim)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:  # fmt: skip
        release = self.builder.release_of(server_round)
        request = self.builder.request(release, arrays)
        if request is None:
            log.warning("Round %d: the release before it is missing; nothing to ask for.", server_round)
            return []
        extra, arrays = request
        return super().configure_train(server_round, arrays, ConfigRecord({**dict(config), **extra}), grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:  # fmt: skip
        release = self.builder.release_of(server_round)
        length = self.builder.vector_length(release)
        total, variance, sites = np.zeros(length), 0.0, 0
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            arrays = reply.content.get("arrays")
            vector = arrays[VECTOR_KEY].numpy() if arrays is not None and VECTOR_KEY in arrays else None
            std = reply.content["metrics"].get(NOISE_STD_KEY) if "metrics" in reply.content else None
            if vector is None or vector.shape != (length,) or not np.all(np.isfinite(vector)):
                log.warning("Round %d: node %d sent no %s vector of length %d; left out.", server_round, node,
                            release, length)  # fmt: skip
                continue
            if not isinstance(std, (int, float)) or not std > 0:
                log.warning("Round %d: node %d did not state a positive noise std; left out.", server_round, node)
                continue
            total += vector
            variance += float(std) ** 2
            sites += 1
        if not sites:
            log.warning("Round %d: no usable %s release; the item tower is unchanged.", server_round, release)
            return None, None
        # Independent noise of each site: the sum's std is the root of the summed variances.
        return self.builder.absorb(server_round, release, total, math.sqrt(variance), sites)

    def checkpoint_state(self) -> dict[str, np.ndarray]:
        return self.builder.checkpoint_state()

    def load_checkpoint_state(self, state: dict[str, np.ndarray]) -> None:
        self.builder.load_checkpoint_state(state)

    def report(self) -> str:
        return self.builder.report("per-site Gaussian releases, summed")


class SecureSpectralTower(SecureDPStep):
    """The spectral tower's three releases under secure aggregation: the coordinator unmasks only the sum of
    at least t sites' integer releases, each with its Skellam noise share (federation-wide DP)."""

    def __init__(self, *, builder: SpectralBuilder, l2_units: int, threshold: int = 0, stage_timeout: float,
                 min_available_nodes: int = 1, min_train_nodes: int = 2, fraction_evaluate: float = 1.0,
                 min_evaluate_nodes: int = 1) -> None:  # fmt: skip
        super().__init__(threshold=threshold, l2_units=l2_units, max_grad_norm=1.0, expected_batch=1.0, table_lr=1.0,
                         lr=1.0, stage_timeout=stage_timeout, min_available_nodes=min_available_nodes,
                         min_train_nodes=min_train_nodes, fraction_evaluate=fraction_evaluate,
                         min_evaluate_nodes=min_evaluate_nodes)  # fmt: skip
        self.builder = builder
        self.l2_units = l2_units

    def summary(self) -> None:
        log.info("SecureSpectralTower: the spectral DP item tower's three releases under secure aggregation")

    def round_request(self, server_round: int, arrays: ArrayRecord) -> tuple[dict, ArrayRecord, int] | None:
        release = self.builder.release_of(server_round)
        request = self.builder.request(release, arrays)
        if request is None:
            return None
        extra, arrays = request
        return extra, arrays, self.builder.vector_length(release)

    def apply_sum(self, server_round: int, arrays: ArrayRecord, total: np.ndarray,
                  survivors: list[int]) -> tuple[ArrayRecord | None, dict]:  # fmt: skip
        release = self.builder.release_of(server_round)
        bound = sensitivity(release, "user", num_candidates=len(self.builder.candidates))
        units = self.l2_units / bound  # integer units per unit of the release
        # The sum's noise: the survivors' independent Skellam shares (each reported its std, in integer units).
        variance = sum(self.noise_std_by_node.get(node, 0.0) ** 2 for node in survivors)
        tower, metrics = self.builder.absorb(server_round, release, total.astype(np.float64) / units,
                                             math.sqrt(variance) / units, len(survivors))  # fmt: skip
        self.steps_taken += 1
        return tower, dict(metrics)

    def checkpoint_state(self) -> dict[str, np.ndarray]:
        return self.builder.checkpoint_state()

    def load_checkpoint_state(self, state: dict[str, np.ndarray]) -> None:
        self.builder.load_checkpoint_state(state)

    def report(self) -> str:
        t = self.last_threshold or self.threshold or "a majority"
        return self.builder.report(f"secure aggregation, t = {t}: the coordinator saw only sums")
