import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtower.data.schema import BEHAVIOURS, ItemIndex
from fedtower.data.weights import BehaviourWeights


def make_events(rows):
    """rows: (user, item, behaviour, timestamp, value) tuples."""
    users, items, behaviours, timestamps, values = zip(*rows) if rows else ([],) * 5
    return pd.DataFrame(
        {
            "user": pd.Series(users, dtype="str"),
            "item": pd.Series(items, dtype="str"),
            "behaviour": pd.Series(behaviours, dtype="str"),
            "timestamp": np.array(timestamps, dtype=np.int64),
            "value": np.array(values, dtype=np.float64),
        }
    )


NAN = math.nan


def test_defaults_rank_purchase_over_cart_over_click_over_view():
    weights = BehaviourWeights()

    table = weights.weights

    assert table == {
        "view": 0.1,
        "click": 0.3,
        "cart": 0.6,
        "purchase": 1.0,
        "rating": 1.0,
        "dwell": 0.3,
    }
    assert weights.rating_threshold == 0.5
    assert weights.dwell_threshold_s == 30.0


def test_partial_table_keeps_defaults_for_unnamed_behaviours():
    weights = BehaviourWeights(weights={"purchase": 2.0, "view": 0.0})

    table = weights.weights

    assert table["purchase"] == 2.0
    assert table["view"] == 0.0
    assert table["cart"] == 0.6


def test_label_and_weight_applies_thresholds_and_zero_weights():
    events = make_events(
        [
            ("a", "x", "view", 1, NAN),  # counts, 0.1
            ("a", "x", "rating", 2, 0.5),  # at the default threshold: counts, 1.0
            ("a", "y", "rating", 3, NAN),  # rating without a value never counts
            ("a", "y", "dwell", 4, 29.0),  # below 30 s
            ("a", "z", "dwell", 5, 30.0),  # at 30 s: counts, 0.3
            ("a", "z", "click", 6, NAN),  # click weighted 0 below: dropped
        ]
    )
    weights = BehaviourWeights(weights={"click": 0.0})

    label, weight = weights.label_and_weight(events)

    assert label.tolist() == [True, True, False, False, True, False]
    np.testing.assert_allclose(weight, [0.1, 1.0, 0.0, 0.0, 0.3, 0.0])


def test_rating_threshold_drops_low_ratings():
    events = make_events([("a", "x", "rating", 1, 3.5), ("a", "y", "rating", 2, 4.0)])

    label, _ = BehaviourWeights(rating_threshold=4.0).label_and_weight(events)

    assert label.tolist() == [False, True]


def test_to_interactions_takes_max_weight_and_earliest_counted_time():
    index = ItemIndex(["z", "y", "x"])  # rows: z=0, y=1, x=2
    events = make_events(
        [
            ("b", "x", "view", 50, NAN),
            ("a", "x", "dwell", 1, 5.0),  # too short: must not set the timestamp
            ("a", "x", "view", 7, NAN),
            ("a", "x", "purchase", 9, NAN),
            ("a", "y", "click", 3, NAN),
            ("a", "y", "cart", 4, NAN),
        ]
    )

    interactions = BehaviourWeights().to_interactions(events, index)

    assert interactions["user"].tolist() == ["a", "a", "b"]
    assert interactions["item"].tolist() == [1, 2, 2]
    assert interactions["timestamp"].tolist() == [3, 7, 50]
    np.testing.assert_allclose(interactions["weight"], [0.6, 1.0, 0.1])
    assert interactions["item"].dtype == np.int64
    assert interactions["timestamp"].dtype == np.int64
    assert interactions["weight"].dtype == np.float32


def test_to_interactions_rejects_items_outside_the_catalogue():
    events = make_events([("a", "ghost", "view", 1, NAN)])

    with pytest.raises(KeyError, match="ghost"):
        BehaviourWeights().to_interactions(events, ItemIndex(["x"]))


def test_unknown_event_behaviour_is_an_error():
    events = make_events([("a", "x", "like", 1, NAN)])

    with pytest.raises(ValueError, match="'like' is not one of the known behaviours"):
        BehaviourWeights().label_and_weight(events)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": {"wishlist": 1.0}}, "unknown behaviours \\['wishlist'\\]"),
        ({"weights": {"view": -0.1}}, "weights must be zero or positive"),
        ({"weights": {"view": NAN}}, "must be a finite number"),
        ({"weights": {"cart": "lots"}}, "must be a number"),
        ({"weights": {b: 0.0 for b in BEHAVIOURS}}, "no event could ever count"),
        ({"dwell_threshold_s": -1.0}, "must be zero or positive"),
        ({"rating_threshold": math.inf}, "must be a finite number"),
    ],
)
def test_invalid_tables_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BehaviourWeights(**kwargs)


def test_from_mapping_reads_run_config_keys():
    config = {"purchase": 2.0, "weight-view": 0.05, "rating-threshold": 4, "dwell_threshold_s": 10}

    weights = BehaviourWeights.from_mapping(config)

    assert weights.weights["purchase"] == 2.0
    assert weights.weights["view"] == 0.05
    assert weights.weights["click"] == 0.3
    assert weights.rating_threshold == 4.0
    assert weights.dwell_threshold_s == 10.0


def test_from_mapping_rejects_unknown_keys():
    with pytest.raises(ValueError, match="'favourite' is not a behaviour-weight setting"):
        BehaviourWeights.from_mapping({"favourite": 1.0})


def naive_interactions(events: pd.DataFrame, index: ItemIndex, weights: BehaviourWeights):
    """A row-by-row reference: {(user, item row): (earliest counted time, max weight)}."""
    best: dict[tuple[str, int], tuple[int, float]] = {}
    for event in events.itertuples(index=False):
        weight = weights.weights[event.behaviour]
        if event.behaviour == "rating" and not event.value >= weights.rating_threshold:
            continue
        if event.behaviour == "dwell" and not event.value >= weights.dwell_threshold_s:
            continue
        if weight <= 0:
            continue
        key = (event.user, index.row(event.item))
        time, strongest = best.get(key, (event.timestamp, weight))
        best[key] = (min(time, event.timestamp), max(strongest, weight))
    return best


event_rows = st.lists(
    st.tuples(
        st.sampled_from(["u1", "u2", "u3"]),
        st.sampled_from(["a", "b", "c", "d"]),
        st.sampled_from(BEHAVIOURS),
        st.integers(0, 20),
        st.one_of(st.just(NAN), st.floats(0.0, 100.0)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(rows=event_rows, view_weight=st.sampled_from([0.0, 0.1]))
def test_to_interactions_matches_a_row_by_row_reference(rows, view_weight):
    index = ItemIndex(["d", "c", "b", "a"])
    events = make_events(rows)
    weights = BehaviourWeights(weights={"view": view_weight}, rating_threshold=3.0)

    interactions = weights.to_interactions(events, index)

    expected = naive_interactions(events, index, weights)
    got = {
        (row.user, row.item): (row.timestamp, float(row.weight))
        for row in interactions.itertuples(index=False)
    }
    assert got.keys() == expected.keys()
    for key, (time, weight) in expected.items():
        assert got[key][0] == time
        assert got[key][1] == pytest.approx(weight)
    order = list(zip(interactions["user"], interactions["timestamp"], interactions["item"]))
    assert order == sorted(order)
