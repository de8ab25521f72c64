import numpy as np
import pandas as pd
import pytest

from fedtower.data.partition import (
    PartitionConfig,
    assign_users,
    category_names,
    partition_events,
    partition_summary,
    partition_users,
    site_sizes,
    user_category_profile,
    users_of_partition,
)
from fedtower.data.schema import Catalogue
from fedtower.data.synthetic import SyntheticConfig, generate
from fedtower.data.weights import BehaviourWeights

SMALL = SyntheticConfig(num_users=300, num_items=400, mean_events_per_user=20, seed=3)


@pytest.fixture(scope="module")
def dataset():
    return generate(SMALL)


@pytest.fixture(scope="module")
def tastes(dataset):
    users = sorted(dataset.events["user"].unique())
    interactions = BehaviourWeights().to_interactions(dataset.events, dataset.catalogue.index)
    return users, user_category_profile(interactions, dataset.catalogue, users)


def make_catalogue(categories):
    n = len(categories)
    return Catalogue(
        items=pd.DataFrame(
            {
                "item": [f"i{row}" for row in range(n)],
                "title": [""] * n,
                "categories": categories,
                "price": [1.0] * n,
                "brand": [""] * n,
            }
        )
    )


def numbered_users(count):
    return [f"u{i:03d}" for i in range(count)]


def top_category_share(profile, assignment):
    """Mean over sites of the share of the site's interactions in its top category."""
    shares = []
    for site in np.unique(assignment):
        totals = profile[assignment == site].sum(axis=0)
        shares.append(totals.max() / totals.sum())
    return float(np.mean(shares))


def test_site_sizes_share_the_rest_by_rank_power_law():
    # One user each, then 7 shared as 6/11, 3/11, 2/11 = 3.82, 1.91, 1.27 -> 3, 1, 1 plus
    # the two largest remainders (1.91, 3.82) -> 4, 2, 1.
    skewed = site_sizes(10, 3, 1.0)
    equal = site_sizes(10, 3, 0.0)

    assert skewed.tolist() == [5, 3, 2]
    assert equal.tolist() == [4, 3, 3]


def test_zero_size_skew_gives_sizes_within_one_user():
    config = PartitionConfig(num_partitions=10, seed=4)

    assignment = assign_users(numbered_users(103), config)

    assert sorted(np.bincount(assignment).tolist()) == [10] * 7 + [11] * 3


def test_heavier_size_skew_gives_larger_max_over_min_ratio():
    users = numbered_users(1000)

    ratios = []
    for skew in (0.0, 0.5, 1.5):
        sizes = np.bincount(assign_users(users, PartitionConfig(size_skew=skew)), minlength=10)
        ratios.append(sizes.max() / sizes.min())

    assert ratios[0] == 1.0
    assert ratios[0] < ratios[1] < ratios[2]


def test_every_site_keeps_a_user_under_extreme_size_skew():
    config = PartitionConfig(num_partitions=10, size_skew=8.0)

    sizes = np.bincount(assign_users(numbered_users(40), config), minlength=10)

    assert sizes.min() == 1
    assert sizes.sum() == 40


def test_same_seed_repeats_and_another_seed_differs(tastes):
    users, profile = tastes
    config = PartitionConfig(num_partitions=6, size_skew=0.5, taste_skew=0.5, seed=1)

    first = assign_users(users, config, user_tastes=profile)
    again = assign_users(users, config, user_tastes=profile)
    other_seed = PartitionConfig(num_partitions=6, size_skew=0.5, taste_skew=0.5, seed=2)
    other = assign_users(users, other_seed, user_tastes=profile)

    np.testing.assert_array_equal(first, again)
    assert (first != other).any()


def test_assignment_does_not_depend_on_the_order_of_users(tastes):
    users, profile = tastes
    config = PartitionConfig(num_partitions=6, size_skew=1.0, taste_skew=0.5, seed=7)
    shuffle = np.random.default_rng(0).permutation(len(users))

    in_order = assign_users(users, config, user_tastes=profile)
    shuffled = assign_users([users[i] for i in shuffle], config, user_tastes=profile[shuffle])

    np.testing.assert_array_equal(shuffled, in_order[shuffle])


def test_full_taste_skew_makes_one_category_per_site_and_zero_mixes_them():
    # 100 users, user i's only category is i % 5; 5 sites of 20.
    users = numbered_users(100)
    one_hot = np.eye(5)[np.arange(100) % 5]

    grouped = assign_users(users, PartitionConfig(num_partitions=5, taste_skew=1.0), user_tastes=one_hot)
    mixed = assign_users(users, PartitionConfig(num_partitions=5, taste_skew=0.0), user_tastes=one_hot)

    category = np.arange(100) % 5
    assert all(len(set(category[grouped == site])) == 1 for site in range(5))
    assert all(len(set(category[mixed == site])) > 1 for site in range(5))


def test_taste_skew_raises_the_share_of_each_sites_top_category(tastes):
    users, profile = tastes

    shares = [
        top_category_share(
            profile,
            assign_users(users, PartitionConfig(num_partitions=6, taste_skew=skew), user_tastes=profile),
        )
        for skew in (0.0, 0.5, 1.0)
    ]

    assert shares[0] < shares[1] < shares[2]
    assert shares[2] > shares[0] + 0.1


def test_user_category_profile_splits_an_item_between_its_categories():
    catalogue = make_catalogue([("a",), ("a", "b"), ("c",)])
    interactions = pd.DataFrame({"user": ["u1", "u1", "u2"], "item": [0, 1, 2]})

    profile = user_category_profile(interactions, catalogue, ["u1", "u2", "u3"])

    assert category_names(catalogue) == ["a", "b", "c"]
    # u1: a gets 1 + 1/2, b gets 1/2, out of 2; u3 has no interactions.
    np.testing.assert_allclose(profile, [[0.75, 0.25, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])


def test_every_user_lands_in_exactly_one_partition(dataset):
    config = PartitionConfig(num_partitions=7, size_skew=1.0, taste_skew=0.5)

    partitions = partition_users(dataset, config)

    everyone = [user for members in partitions.values() for user in members]
    assert sorted(partitions) == list(range(7))
    assert len(everyone) == len(set(everyone)) == 300
    assert set(everyone) == set(dataset.events["user"])
    assert all(members == sorted(members) and members for members in partitions.values())


def test_users_scheme_gives_each_user_a_client_in_id_order(dataset):
    config = PartitionConfig(scheme="users", num_partitions=0)

    assignment = assign_users(["b", "a", "c"], config)
    partitions = partition_users(dataset, config)

    assert assignment.tolist() == [1, 0, 2]
    assert len(partitions) == 300
    assert partitions[0] == ["u00000"]
    assert all(len(members) == 1 for members in partitions.values())


def test_partition_events_keeps_the_catalogue_and_only_that_partitions_events(dataset):
    config = PartitionConfig(num_partitions=4, seed=2)

    part = partition_events(dataset, config, 3)

    members = users_of_partition(dataset, config, 3)
    expected = dataset.events[dataset.events["user"].isin(members)].reset_index(drop=True)
    assert part.catalogue is dataset.catalogue
    pd.testing.assert_frame_equal(part.events, expected)
    assert set(part.events["user"]) == set(members)


def test_users_of_partition_rejects_an_id_past_the_last_partition(dataset):
    config = PartitionConfig(num_partitions=4)

    with pytest.raises(ValueError, match="partition_id 4 is out of range.*4 partitions"):
        users_of_partition(dataset, config, 4)


def test_partition_summary_reports_sizes_and_gini():
    # Sizes 2, 1, 3: Gini = ((-2)*1 + 0*2 + 2*3) / (3 * 6) = 2/9.
    summary = partition_summary(np.array([0, 0, 1, 2, 2, 2]))

    assert summary == pytest.approx(
        {"partitions": 3, "users": 6, "min_size": 1, "median_size": 2.0, "max_size": 3, "gini": 2 / 9}
    )
    assert partition_summary(np.array([0, 1, 2, 0, 1, 2]))["gini"] == 0.0


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"scheme": "devices"}, "scheme must be one of"),
        ({"num_partitions": -1}, "num_partitions must be a whole number"),
        ({"num_partitions": 2.5}, "num_partitions must be a whole number"),
        ({"num_partitions": 0}, "needs at least one site"),
        ({"size_skew": -0.1}, "size_skew must be 0 or more"),
        ({"size_skew": float("nan")}, "size_skew must be a finite number"),
        ({"taste_skew": 1.5}, "taste_skew .* between 0 and 1"),
        ({"seed": -1}, "seed must be a whole number"),
        ({"scheme": "users", "num_partitions": 0, "size_skew": 0.5}, "only to the 'sites' scheme"),
    ],
)
def test_bad_configs_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        PartitionConfig(**settings)


@pytest.mark.parametrize(
    "users, config, user_tastes, message",
    [
        (["a", "b"], PartitionConfig(num_partitions=3), None, "more than the number of users"),
        (["a", "b"], PartitionConfig(scheme="users", num_partitions=3), None, "set it to 2 or to 0"),
        (["a", "a"], PartitionConfig(num_partitions=1), None, "more than once"),
        (["a", "b"], PartitionConfig(num_partitions=1, taste_skew=0.5), None, "needs user_tastes"),
        (["a", "b"], PartitionConfig(num_partitions=1, taste_skew=0.5), np.ones((3, 2)), "one row per user"),
    ],
)
def test_bad_assignments_are_refused(users, config, user_tastes, message):
    with pytest.raises(ValueError, match=message):
        assign_users(users, config, user_tastes=user_tastes)
