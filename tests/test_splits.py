from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedtower.data.schema import ItemIndex
from fedtower.data.splits import history_csr, leave_one_out, temporal_split, user_histories
from fedtower.data.weights import BehaviourWeights

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MOVIELENS = SHARED_DATA / "ml-latest-small"


def make_interactions(rows):
    """rows: (user, item row, timestamp) tuples; weight 1 for all."""
    users, items, timestamps = zip(*rows)
    return pd.DataFrame(
        {
            "user": pd.Series(users, dtype="str"),
            "item": np.array(items, dtype=np.int64),
            "timestamp": np.array(timestamps, dtype=np.int64),
            "weight": np.ones(len(rows), dtype=np.float32),
        }
    )


# a: 5 interactions -> ceil(1.0) = 1 test. b: 6 -> ceil(1.2) = 2 test, with a time tie
# across the boundary broken by item row. c: 1 -> train only. d: 2 -> 1 test.
SMALL = make_interactions(
    [
        ("b", 6, 5),
        ("a", 3, 10),
        ("a", 1, 20),
        ("a", 2, 20),
        ("c", 7, 1),
        ("a", 0, 30),
        ("a", 5, 40),
        ("b", 0, 1),
        ("b", 1, 2),
        ("b", 2, 3),
        ("b", 5, 5),
        ("b", 4, 5),
        ("d", 9, 8),
        ("d", 8, 9),
    ]
)


def items_by_user(frame):
    return {user: group["item"].tolist() for user, group in frame.groupby("user", sort=True)}


def test_temporal_split_holds_out_the_latest_fifth_per_user():
    train, test = temporal_split(SMALL)

    assert items_by_user(test) == {"a": [5], "b": [5, 6], "d": [8]}
    assert items_by_user(train) == {"a": [3, 1, 2, 0], "b": [0, 1, 2, 4], "c": [7], "d": [9]}


def test_temporal_split_counts_users_it_cannot_evaluate():
    split = temporal_split(SMALL)

    assert split.train_only_users == 1


def test_temporal_split_keeps_weights_and_sorts_by_user_then_time():
    train, _ = temporal_split(SMALL)

    assert list(train.columns) == ["user", "item", "timestamp", "weight"]
    assert train["user"].tolist() == ["a"] * 4 + ["b"] * 4 + ["c", "d"]
    assert train["timestamp"].tolist() == [10, 20, 20, 30, 1, 2, 3, 5, 1, 8]


def test_temporal_split_rounds_up_without_floating_point_overshoot():
    # 0.07 * 100 is 7.000000000000001 in floating point; the protocol means 7.
    interactions = make_interactions([("a", i, i) for i in range(100)])

    _, test = temporal_split(interactions, test_fraction=0.07)

    assert test["item"].tolist() == list(range(93, 100))


def test_temporal_split_always_leaves_one_training_interaction():
    interactions = make_interactions([("a", 0, 1), ("a", 1, 2)])

    train, test = temporal_split(interactions, test_fraction=0.9)

    assert train["item"].tolist() == [0]
    assert test["item"].tolist() == [1]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2])
def test_temporal_split_rejects_fractions_outside_zero_one(fraction):
    with pytest.raises(ValueError, match="between 0 and 1"):
        temporal_split(SMALL, test_fraction=fraction)


def test_leave_one_out_holds_out_latest_and_samples_unseen_negatives():
    split = leave_one_out(SMALL, num_negatives=3, seed=7, num_items=10)

    assert split.test_items.index.tolist() == ["a", "b", "d"]
    assert split.test_items.tolist() == [5, 6, 8]
    assert items_by_user(split.train)["c"] == [7]
    assert len(split.train) == len(SMALL) - 3
    assert split.negatives.shape == (3, 3)
    seen = {user: set(items) for user, items in items_by_user(SMALL).items()}
    for user, negatives in zip(split.test_items.index, split.negatives):
        assert len(set(negatives.tolist())) == 3
        assert not set(negatives.tolist()) & seen[user]
        assert negatives.min() >= 0 and negatives.max() < 10


def test_leave_one_out_negatives_are_the_complement_when_it_is_exactly_large_enough():
    # User a saw rows {0, 1, 2, 3, 5}; of 10 rows exactly 5 are unseen: {4, 6, 7, 8, 9}.
    interactions = SMALL[SMALL["user"] == "a"]

    split = leave_one_out(interactions, num_negatives=5, seed=0, num_items=10, pool="catalogue")

    assert sorted(split.negatives[0].tolist()) == [4, 6, 7, 8, 9]


def test_leave_one_out_handles_users_who_saw_almost_the_whole_catalogue():
    # 99,990 of 100,000 rows seen: rejection sampling gives up and the exact path is used.
    rows = np.arange(100_000)
    unseen = rows[::10_000] + 7
    seen = np.setdiff1d(rows, unseen)
    interactions = pd.DataFrame(
        {"user": "a", "item": seen, "timestamp": np.arange(len(seen), dtype=np.int64)}
    )

    split = leave_one_out(interactions, num_negatives=10, seed=3, num_items=100_000, pool="catalogue")

    assert sorted(split.negatives[0].tolist()) == unseen.tolist()


def test_leave_one_out_is_deterministic_by_seed():
    first = leave_one_out(SMALL, num_negatives=3, seed=11, num_items=1000)
    again = leave_one_out(SMALL, num_negatives=3, seed=11, num_items=1000)
    other = leave_one_out(SMALL, num_negatives=3, seed=12, num_items=1000)

    np.testing.assert_array_equal(first.negatives, again.negatives)
    assert not np.array_equal(first.negatives, other.negatives)


def test_leave_one_out_refuses_when_too_few_unseen_items():
    with pytest.raises(ValueError, match="User 'a' has fewer than 6 catalogue items it never interacted"):
        leave_one_out(SMALL, num_negatives=6, seed=0, num_items=10, pool="catalogue")


def test_user_histories_are_in_time_order_and_empty_for_unknown_users():
    histories = user_histories(SMALL, ["b", "nobody", "a"])

    assert [h.tolist() for h in histories] == [[0, 1, 2, 4, 5, 6], [], [3, 1, 2, 0, 5]]


def test_history_csr_offsets_delimit_each_user():
    indptr, items = history_csr(SMALL, ["d", "c"])

    assert indptr.tolist() == [0, 2, 3]
    assert items.tolist() == [9, 8, 7]


def test_history_csr_rejects_repeated_users():
    with pytest.raises(ValueError, match="more than once"):
        history_csr(SMALL, ["a", "a"])


@pytest.fixture(scope="module")
def movielens_interactions():
    if not (MOVIELENS / "ratings.csv").exists():
        pytest.skip(f"MovieLens ml-latest-small is not available at {MOVIELENS}.")
    ratings = pd.read_csv(MOVIELENS / "ratings.csv")
    movies = pd.read_csv(MOVIELENS / "movies.csv")
    events = pd.DataFrame(
        {
            "user": ratings["userId"].astype(str),
            "item": ratings["movieId"].astype(str),
            "behaviour": "rating",
            "timestamp": ratings["timestamp"].astype(np.int64),
            "value": ratings["rating"].astype(np.float64),
        }
    )
    index = ItemIndex(movies["movieId"].astype(str).tolist())
    return BehaviourWeights().to_interactions(events, index), len(index)


@pytest.mark.shared_data
def test_movielens_temporal_split_matches_the_benchmark_protocol(movielens_interactions):
    interactions, _ = movielens_interactions

    split = temporal_split(interactions)

    assert len(interactions) == 100_836
    assert len(split.train) == 80_419
    assert len(split.test) == 20_417
    assert split.test["user"].nunique() == 610
    assert split.train_only_users == 0


@pytest.mark.shared_data
def test_movielens_leave_one_out_has_one_test_item_and_99_negatives_per_user(
    movielens_interactions,
):
    interactions, num_items = movielens_interactions

    split = leave_one_out(interactions, seed=0, num_items=num_items)

    assert len(split.test_items) == 610
    assert split.negatives.shape == (610, 99)
    assert len(split.train) == 100_836 - 610
    seen = set(zip(interactions["user"], interactions["item"]))
    users = np.repeat(split.test_items.index.to_numpy(), 99)
    assert not any((u, i) in seen for u, i in zip(users, split.negatives.ravel().tolist()))
    assert all(len(set(row)) == 99 for row in split.negatives.tolist())


def test_a_groups_split_is_the_whole_split_cut_to_its_users():
    # Prepare: synthetic events of every behaviour, cut into skewed sites, and one user per client.
    from fedtower.data.partition import PartitionConfig, partition_events, users_of_partition
    from fedtower.data.prepared import prepare_split
    from fedtower.data.sources import resolve_dataset

    dataset = resolve_dataset("synthetic:users=200,items=60,seed=5")[0]
    whole = prepare_split(dataset)
    configs = [PartitionConfig(num_partitions=6, size_skew=0.8, seed=1),
               PartitionConfig(scheme="users", num_partitions=0)]

    for config in configs:
        count = config.num_partitions or dataset.events["user"].nunique()
        for partition in range(0, count, 1 if count < 50 else 17):
            # Execute
            expected = prepare_split(partition_events(dataset, config, partition))
            cut = whole.subset(users_of_partition(dataset, config, partition))
            # Assert: the same users, histories and weights as preparing the partition's events alone.
            for got, want in ((cut.train, expected.train), (cut.test, expected.test)):
                assert got.users == want.users
                assert np.array_equal(got.indptr, want.indptr)
                assert np.array_equal(got.items, want.items) and np.array_equal(got.weights, want.weights)


def test_a_subset_leaves_out_users_without_a_counted_event_and_sorts_the_rest():
    # Prepare: u3 only dwelt 5 s on an item (under the 30 s threshold), so prepare_split holds no u3.
    import pandas as pd

    from fedtower.data.prepared import prepare_split
    from fedtower.data.schema import Catalogue, Dataset

    catalogue = Catalogue(pd.DataFrame({"item": ["a", "b", "c"], "title": ["A", "B", "C"], "categories": [()] * 3,
                                        "price": [1.0] * 3, "brand": ["x"] * 3}))
    events = pd.DataFrame({"user": ["u2", "u2", "u1", "u1", "u3"], "item": ["a", "b", "a", "c", "b"],
                           "timestamp": [1, 2, 3, 4, 5], "behaviour": ["click", "click", "click", "purchase", "dwell"],
                           "value": [None, None, None, None, 5.0]})  # fmt: skip
    whole = prepare_split(Dataset(catalogue, events))

    # Execute
    cut = whole.subset(["u3", "u2", "u1"])

    # Assert
    assert "u3" not in whole.users and cut.users == ["u1", "u2"]
    assert cut.train.items_of(0).tolist() == [0] and cut.test.items_of(0).tolist() == [2]  # u1: a, then c


def test_a_simulated_node_reads_its_users_from_one_assignment_per_process():
    # Prepare: one user per client over a synthetic dataset, through the node's own loader.
    from fedtower.client import local
    from fedtower.config import RunSettings
    from fedtower.data.partition import PartitionConfig, users_of_partition
    from fedtower.data.sources import resolve_dataset

    spec = "synthetic:users=120,items=40,seed=2"
    settings = RunSettings(data=spec, partitioning="users")
    dataset = resolve_dataset(spec)[0]
    config = PartitionConfig(scheme="users", num_partitions=0)
    local._partition_maps.clear()

    # Execute: three nodes load their data.
    loaded = [local.load_node_data(settings, {"partition-id": p, "num-partitions": 0}) for p in (0, 57, 119)]

    # Assert: one assignment was computed and kept, and every node holds exactly the users the
    # uncached assignment gives its partition.
    assert len(local._partition_maps) == 1
    for node, p in zip(loaded, (0, 57, 119), strict=True):
        assert node.users == users_of_partition(dataset, config, p)
