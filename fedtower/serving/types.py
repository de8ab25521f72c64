"""What serving takes and returns: plain dataclasses with `to_dict()` (JSON-ready)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

INDEX_KINDS = ("auto", "exact", "ivf")


class UnknownUserError(ValueError):
    """The user has no state on this node (an HTTP layer answers 404)."""


class UnknownItemError(ValueError):
    """The item is not in the public catalogue (an HTTP layer answers 404 or 422)."""


class ItemExistsError(ValueError):
    """An item to add is already in the served catalogue (an HTTP layer answers 409)."""


@dataclass(frozen=True)
class Filters:
    """Which catalogue items may be recommended.

    categories: keep items in any of these categories. min_price / max_price:
    keep items whose price is known and within the bounds (inclusive).
    available: keep only these item ids (e.g. what is in stock).
    """

    categories: tuple[str, ...] | None = None
    min_price: float | None = None
    max_price: float | None = None
    available: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("categories", "available"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"Filter '{name}' must be a list of strings, not one string {value!r}.")
            if value is not None:
                object.__setattr__(self, name, tuple(str(v) for v in value))
        for name in ("min_price", "max_price"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not math.isfinite(float(value))):
                raise ValueError(f"Filter '{name}' must be a finite number, got {value!r}.")
        if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
            raise ValueError(
                f"Filter 'min_price' ({self.min_price}) is above 'max_price' ({self.max_price})."
            )

    @property
    def active(self) -> bool:
        return any(getattr(self, n) is not None for n in ("categories", "min_price", "max_price", "available"))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TableOptions:
    """How a served table is held (precision) and searched (exact, or an approximate index proposing candidates)."""

    precision: str = "fp32"  # "fp32" | "fp16" | "int8"
    index: str = "auto"  # "auto" (exact below fedtower.serving.index.AUTO_MIN_ITEMS) | "exact" | "ivf"
    index_probes: int = 64  # inverted lists searched per query (64 of 4096: recall@10 1.0 at 10^6 items)
    index_lists: int = 0  # inverted lists (0: about 4 sqrt(items))

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16", "int8"):
            raise ValueError(f"precision must be 'fp32', 'fp16' or 'int8', got {self.precision!r}.")
        if self.index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {', '.join(INDEX_KINDS)}, got {self.index!r}.")
        if isinstance(self.index_probes, bool) or not isinstance(self.index_probes, int) or self.index_probes < 1:
            raise ValueError(f"index_probes must be a positive integer, got {self.index_probes!r}.")
        if isinstance(self.index_lists, bool) or not isinstance(self.index_lists, int) or self.index_lists < 0:
            raise ValueError(f"index_lists must be 0 (automatic) or a positive integer, got {self.index_lists!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Contribution:
    """How much one history item adds to a recommended item's score.

    contribution = pooling weight of the history item x <its vector, the item's
    vector>; summed over the history (plus the free user part and the item
    bias) it gives the score exactly. With method "similarity" (a model scored
    without history pooling) it is the cosine of the two item vectors instead.
    """

    item: str
    title: str
    contribution: float
    weight: float  # the history item's pooling weight (0 for "similarity")
    similarity: float  # cosine of the two item vectors
    method: str = "pooling"  # "pooling" | "similarity"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Recommendation:
    item: str
    title: str
    score: float  # the model's score <user, item> + bias (before any re-ranking)
    categories: list[str] = field(default_factory=list)
    explanation: list[Contribution] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "item": self.item,
            "title": self.title,
            "score": self.score,
            "categories": list(self.categories),
            "explanation": [c.to_dict() for c in self.explanation],
        }


@dataclass(frozen=True)
class ServingConfig:
    """How a node serves; the pooling settings must be the ones the model trained with."""

    history_len: int = 200
    recency: float = 3.0
    pooling: str = "mean"
    pool_history: bool = True  # False for interaction-level DP-SGD models (free embedding only)
    user_blocks: tuple[int, ...] = ()  # the model's TwoTowerConfig.user_blocks (the spectral DP tower)
    precision: str = "fp32"  # "fp32" | "fp16" | "int8": how the item table is held and scored
    index: str = "auto"  # "auto" | "exact" | "ivf": how top-k is searched (see TableOptions)
    index_probes: int = 64
    index_lists: int = 0
    rerank_pool: int = 200  # candidates MMR and category caps choose from (at least 10 x k)
    update_steps: int = 5  # record(): gradient steps on the user's own row
    update_lr: float = 0.05
    update_sample: int = 4096  # catalogues over 4 x this: sampled softmax in record()'s steps
    user_l2: float = 1.0  # the same L2 pull towards 0 as in training
    # Cold start: site prior + n / (n + shrink) x pooled history of a new user's n events. The prior
    # is the mean vector of this node's own users (local only); cold_prior=False pools alone.
    cold_prior: bool = True
    cold_shrink: float = 2.0

    def __post_init__(self) -> None:
        self.table_options  # validates precision and the index settings
        if self.pooling not in ("mean", "attention"):
            raise ValueError(f"pooling must be 'mean' or 'attention', got {self.pooling!r}.")
        if not self.cold_shrink >= 0:
            raise ValueError(f"cold_shrink must be 0 or more, got {self.cold_shrink}.")
        if self.history_len < 1 or self.rerank_pool < 1 or self.update_steps < 0:
            raise ValueError("history_len and rerank_pool must be at least 1, update_steps at least 0.")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def table_options(self) -> TableOptions:
        return TableOptions(precision=self.precision, index=self.index, index_probes=self.index_probes,
                            index_lists=self.index_lists)  # fmt: skip
