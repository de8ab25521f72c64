"""Behaviour weights: which events count as positives, and how strongly.

The table turns raw behaviour events into implicit-feedback interactions.
Dropping an event here (below a threshold, or a behaviour weighted 0) is a
labelling decision made by the run config, not data loss: the event log itself
is never modified.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedtower.data.schema import BEHAVIOURS, ItemIndex

DEFAULT_WEIGHTS: dict[str, float] = {
    "view": 0.1,
    "click": 0.3,
    "cart": 0.6,
    "purchase": 1.0,
    "rating": 1.0,
    "dwell": 0.3,
}

INTERACTION_COLUMNS: tuple[str, ...] = ("user", "item", "timestamp", "weight")


@dataclass
class BehaviourWeights:
    """Weight per behaviour, plus the value thresholds for ratings and dwell.

    Behaviours missing from `weights` take their default weight; set a weight
    to 0 to ignore that behaviour. A rating counts when its value is at least
    `rating_threshold` (the default 0.5 counts every rating, which is the
    benchmark protocol); a dwell counts when it lasted at least
    `dwell_threshold_s` seconds. Events of those two behaviours with no value
    never count.
    """

    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    rating_threshold: float = 0.5
    dwell_threshold_s: float = 30.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(BEHAVIOURS))
        if unknown:
            raise ValueError(
                f"Behaviour weights name unknown behaviours {unknown}; "
                f"the known behaviours are {list(BEHAVIOURS)}."
            )
        merged = dict(DEFAULT_WEIGHTS)
        for behaviour, weight in self.weights.items():
            merged[behaviour] = _finite_float(weight, f"The weight of '{behaviour}'")
            if merged[behaviour] < 0:
                raise ValueError(
                    f"The weight of '{behaviour}' is {merged[behaviour]}, "
                    "but weights must be zero or positive."
                )
        if not any(merged.values()):
            raise ValueError("Every behaviour weight is zero, so no event could ever count.")
        self.weights = merged
        self.rating_threshold = _finite_float(self.rating_threshold, "The rating threshold")
        self.dwell_threshold_s = _finite_float(self.dwell_threshold_s, "The dwell threshold")
        if self.dwell_threshold_s < 0:
            raise ValueError(
                f"The dwell threshold is {self.dwell_threshold_s} s, but it must be zero or positive."
            )

    @classmethod
    def from_mapping(cls, config: Mapping[str, object]) -> BehaviourWeights:
        """Build from run-config style keys.

        Accepted keys: a behaviour name (e.g. "purchase") or "weight-<behaviour>"
        for its weight, "rating-threshold" and "dwell-threshold-s" (underscores
        work too). Keys not given keep their defaults; unknown keys are errors.
        """
        weights: dict[str, float] = {}
        thresholds: dict[str, float] = {}
        for raw_key, value in config.items():
            key = str(raw_key).replace("_", "-").removeprefix("weight-")
            if key in BEHAVIOURS:
                weights[key] = value  # validated in __post_init__
            elif key == "rating-threshold":
                thresholds["rating_threshold"] = value
            elif key in ("dwell-threshold-s", "dwell-threshold"):
                thresholds["dwell_threshold_s"] = value
            else:
                raise ValueError(
                    f"'{raw_key}' is not a behaviour-weight setting; use a behaviour name "
                    f"{list(BEHAVIOURS)}, 'rating-threshold' or 'dwell-threshold-s'."
                )
        return cls(weights=weights, **thresholds)

    def label_and_weight(self, events: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Per event: whether it counts as a positive, and its weight (0 when it does not)."""
        codes = _behaviour_codes(events["behaviour"])
        table = np.array([self.weights[b] for b in BEHAVIOURS], dtype=np.float64)
        weight = table[codes]
        value = events["value"].to_numpy(dtype=np.float64, na_value=np.nan)
        # NaN compares False, so a rating or dwell without a value never passes.
        rating = codes == BEHAVIOURS.index("rating")
        dwell = codes == BEHAVIOURS.index("dwell")
        passes = np.ones(len(codes), dtype=bool)
        passes[rating] = value[rating] >= self.rating_threshold
        passes[dwell] = value[dwell] >= self.dwell_threshold_s
        label = passes & (weight > 0)
        return label, np.where(label, weight, 0.0)

    def to_interactions(self, events: pd.DataFrame, index: ItemIndex) -> pd.DataFrame:
        """One interaction per (user, item) from the events that count.

        Columns: user (str), item (int64 row in `index`), timestamp (int64, the
        earliest counted event), weight (float32 > 0, the strongest counted
        event). Rows are sorted by (user, timestamp, item). Raises KeyError
        when an event names an item that is not in the catalogue.
        """
        label, weight = self.label_and_weight(events)
        counted = events.loc[label, ["user", "item", "timestamp"]]
        # Map each distinct item id once, not once per event.
        item_codes, item_ids = pd.factorize(counted["item"].astype(str))
        rows = index.rows(item_ids)[item_codes] if len(item_ids) else np.empty(0, np.int64)
        user_codes, user_ids = pd.factorize(counted["user"].astype(str), sort=True)
        pairs = pd.DataFrame(
            {
                "user": user_codes,
                "item": rows,
                "timestamp": counted["timestamp"].to_numpy(dtype=np.int64),
                "weight": weight[label],
            }
        )
        grouped = pairs.groupby(["user", "item"], sort=False).agg(
            timestamp=("timestamp", "min"), weight=("weight", "max")
        )
        user = grouped.index.get_level_values("user").to_numpy()
        item = grouped.index.get_level_values("item").to_numpy().astype(np.int64)
        timestamp = grouped["timestamp"].to_numpy(dtype=np.int64)
        order = np.lexsort((item, timestamp, user))
        return pd.DataFrame(
            {
                "user": pd.Series(user_ids, dtype="str").take(user[order]).reset_index(drop=True),
                "item": item[order],
                "timestamp": timestamp[order],
                "weight": grouped["weight"].to_numpy(dtype=np.float32)[order],
            }
        )


def _behaviour_codes(behaviour: pd.Series) -> np.ndarray:
    codes = pd.Index(BEHAVIOURS).get_indexer(behaviour)
    unknown = codes < 0
    if unknown.any():
        first = behaviour.iloc[int(np.flatnonzero(unknown)[0])]
        raise ValueError(
            f"Event behaviour {first!r} is not one of the known behaviours {list(BEHAVIOURS)}."
        )
    return codes.astype(np.int64)


def _finite_float(value: object, what: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, but it is {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, but it is {number}.")
    return number
