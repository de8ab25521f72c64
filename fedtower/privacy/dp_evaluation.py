"""Federated evaluation under DP: Gaussian noise on bounded per-user sums, charged like training.

An evaluation reply of a DP run holds six sums over the node's evaluated users:
the number of users, and the sums of each user's NDCG@k, recall@k,
precision@k, reciprocal rank and hit (0 or 1). Every user adds at most 1 to
each (all six are in [0, 1] per user), and a user's metrics depend on that
user's own events and the released model only, so adding or removing one
user, or one event (which moves one user's metrics), changes the vector by at
most sqrt(6) in L2. The node adds N(0, (z sqrt(6))^2) to each sum and charges
one Gaussian mechanism with noise multiplier z to its accountant, the same
accountant its DP-SGD steps are charged to.

Nothing else is released: no per-item counts (coverage, novelty), no AUC,
no skipped-user count. Noisy sums merge across nodes by addition, as exact
sums do, and their variances add; `finalize` divides by the noisy user count
and reports the noise level of each metric next to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedtower.metrics import RankingSums
from fedtower.privacy.secure_random import DPRandom

FIELDS = ("users", "ndcg", "recall", "precision", "mrr", "hit_users")
SENSITIVITY = math.sqrt(len(FIELDS))  # one user adds at most 1 to each sum
MARKER = "dp-evaluation"  # a metric key only DP evaluation replies carry
_METRIC_NAMES = {"ndcg": "ndcg@{k}", "recall": "recall@{k}", "precision": "precision@{k}", "mrr": "mrr",
                 "hit_users": "hr@{k}"}  # fmt: skip


def bounded_sums(sums: RankingSums) -> dict[str, float]:
    """The six released sums of exact ranking sums; checks each user added at most 1 to each."""
    values = {name: float(getattr(sums, name)) for name in FIELDS}
    for name, value in values.items():
        if value < 0 or value > sums.users + 1e-6:
            raise ValueError(f"The {name} sum {value} is outside [0, users = {sums.users}]: a user added more "
                             "than 1, so the DP sensitivity bound would not hold.")  # fmt: skip
    return values


@dataclass
class NoisyEvaluation:
    """Evaluation sums with Gaussian noise of known variance; merges by addition."""

    k: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FIELDS, 0.0))
    variance: float = 0.0  # of the noise on each sum
    nodes: int = 0

    @classmethod
    def release(cls, sums: RankingSums, *, noise_multiplier: float, randomness: DPRandom) -> NoisyEvaluation:
        """The DP release of a node's exact sums: each sum plus N(0, (noise_multiplier x sqrt(6))^2)."""
        if not noise_multiplier > 0:
            raise ValueError(f"A DP evaluation needs a positive noise multiplier, got {noise_multiplier}.")
        std = noise_multiplier * SENSITIVITY
        noise = randomness.standard_normal(len(FIELDS), dtype=torch.float64).tolist()
        exact = bounded_sums(sums)
        noisy = {name: exact[name] + std * z for name, z in zip(FIELDS, noise, strict=True)}
        return cls(k=sums.k, sums=noisy, variance=std**2, nodes=1)

    @classmethod
    def exact(cls, sums: RankingSums) -> NoisyEvaluation:
        """Exact sums (a node that opted in to raw evaluation) in the same form, with no noise."""
        return cls(k=sums.k, sums=bounded_sums(sums), variance=0.0, nodes=1)

    def __add__(self, other: NoisyEvaluation) -> NoisyEvaluation:
        if self.k and other.k and self.k != other.k:
            raise ValueError(f"Cannot merge evaluations at k={self.k} and k={other.k}.")
        merged = {name: self.sums[name] + other.sums[name] for name in FIELDS}
        return NoisyEvaluation(self.k or other.k, merged, self.variance + other.variance, self.nodes + other.nodes)

    # ------------------------------------------------------------ Flower records
    def to_metrics(self) -> dict[str, float | int]:
        return {MARKER: 1, "k": self.k, **{f"dp-{n}": self.sums[n] for n in FIELDS}, "dp-noise-std": self.std}

    @classmethod
    def from_metrics(cls, payload: Mapping[str, object]) -> NoisyEvaluation:
        missing = [key for key in ("k", "dp-noise-std", *(f"dp-{n}" for n in FIELDS)) if key not in payload]
        if missing:
            raise ValueError(f"The DP evaluation payload is missing {', '.join(missing)}.")
        values = {n: float(payload[f"dp-{n}"]) for n in FIELDS}
        std = float(payload["dp-noise-std"])
        if not all(math.isfinite(v) for v in values.values()) or not (math.isfinite(std) and std >= 0):
            raise ValueError("The DP evaluation payload holds a non-finite sum or noise level.")
        return cls(int(payload["k"]), values, std**2, 1)

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    def finalize(self) -> dict[str, float]:
        """Means over the (noisy) user count, and each mean's noise level ("... noise": its std)."""
        users = self.sums["users"]
        out: dict[str, float] = {"users": users, "dp-noise-std": self.std, "dp-nodes": self.nodes}
        if users < 1:  # the noise swamps the count: no mean can be told apart from noise
            return out
        for name, template in _METRIC_NAMES.items():
            key = template.format(k=self.k)
            out[key] = self.sums[name] / users
            out[f"{key}-noise"] = self.std / users
        return out
