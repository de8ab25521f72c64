"""On-device serving: recommend, explain, re-rank, bundle, cold start and record, all local."""

from fedtower.serving.recommender import Recommender, RecordResult
from fedtower.serving.scoring import ItemTable, QuantizedRows, top_k
from fedtower.serving.types import (
    Contribution,
    Filters,
    ItemExistsError,
    Recommendation,
    ServingConfig,
    UnknownItemError,
    UnknownUserError,
)

__all__ = [
    "Contribution",
    "Filters",
    "ItemExistsError",
    "ItemTable",
    "QuantizedRows",
    "Recommendation",
    "Recommender",
    "RecordResult",
    "ServingConfig",
    "UnknownItemError",
    "UnknownUserError",
    "top_k",
]
