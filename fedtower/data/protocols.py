"""Evaluation protocols by name: how data is split and where sampled negatives come from.

Plain constants and one frozen dataclass, without pandas, so that the run config can name them cheaply;
the splitting itself is in splits.py.
"""

from __future__ import annotations

from dataclasses import dataclass

# How events are ordered in time: by their timestamp column, or by their place in the files.
EVENT_ORDERS: tuple[str, ...] = ("timestamp", "file")

# How each user's interactions become train and test (run config `split`, node config `split`).
SPLITS: dict[str, str] = {
    "temporal": "each user's latest share (test-fraction) of interactions held out (BENCHMARKS.md protocol)",
    "leave-one-out": "each user's latest interaction held out (NCF protocol)",
    "none": "every interaction trains; nothing is held out, so nothing is evaluated",
}


# Where leave-one-out negatives come from. "interacted" is the NCF protocol (He et al. 2017, and its
# reference code): items that occur in the interaction data, less the user's own. "catalogue" draws from
# every catalogue row, items nobody interacted with included; those are easy negatives, so it reads higher.
NEGATIVE_POOLS: dict[str, str] = {
    "interacted": "items in the interaction data the user never interacted with (NCF protocol)",
    "catalogue": "catalogue items the user never interacted with (items no one interacted with included)",
}


@dataclass(frozen=True)
class SplitSpec:
    """How a dataset is split for evaluation; public, the same for every party that applies it.

    `num_negatives` and `negative_pool` apply to leave-one-out: each held-out
    item is also ranked against that many sampled negatives (0: full ranking
    only), drawn with `seed` (evaluation only, nothing private depends on it).
    """

    kind: str = "temporal"
    test_fraction: float = 0.2
    num_negatives: int = 99
    negative_pool: str = "interacted"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SPLITS:
            raise ValueError(f"The split must be one of {list(SPLITS)}, got {self.kind!r}.")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"The test fraction must be between 0 and 1, but it is {self.test_fraction}.")
        if self.num_negatives < 0:
            raise ValueError(f"The number of negatives must be 0 or more, but it is {self.num_negatives}.")
        if self.negative_pool not in NEGATIVE_POOLS:
            raise ValueError(f"The negative pool must be one of {list(NEGATIVE_POOLS)}, got {self.negative_pool!r}.")

    def describe(self) -> str:
        """One line that says what the figures computed on this split mean."""
        if self.kind == "temporal":
            return f"temporal: each user's latest {self.test_fraction:.0%} of interactions held out, full ranking"
        if self.kind == "leave-one-out":
            sampled = (f"; also ranked against {self.num_negatives} sampled negatives: "
                       f"{NEGATIVE_POOLS[self.negative_pool]}") if self.num_negatives else ""  # fmt: skip
            return f"leave-one-out: each user's latest interaction held out, full ranking{sampled}"
        return "none: every interaction trains, nothing is evaluated"
