import numpy as np
import pandas as pd
import pytest

from fedtower.data.schema import EVENT_COLUMNS
from fedtower.data.splits import history_csr, temporal_split
from fedtower.data.synthetic import SyntheticConfig, generate, to_folder
from fedtower.data.weights import BehaviourWeights

SMALL = SyntheticConfig(num_users=300, num_items=600, mean_events_per_user=30, seed=5)


@pytest.fixture(scope="module")
def dataset():
    return generate(SMALL)


def test_same_seed_gives_identical_frames(dataset):
    again = generate(SMALL)

    pd.testing.assert_frame_equal(dataset.events, again.events)
    pd.testing.assert_frame_equal(dataset.catalogue.items, again.catalogue.items)
    np.testing.assert_array_equal(dataset.catalogue.features, again.catalogue.features)


def test_another_seed_gives_another_log(dataset):
    other = generate(SyntheticConfig(num_users=300, num_items=600, mean_events_per_user=30, seed=6))

    assert not dataset.events["item"].equals(other.events["item"])


def test_events_follow_the_canonical_schema(dataset):
    events = dataset.events

    assert tuple(events.columns) == EVENT_COLUMNS
    assert events["timestamp"].dtype == np.int64
    assert events["value"].dtype == np.float64
    assert events["value"].isna().all()
    assert set(events["behaviour"]) == {"view", "click", "cart", "purchase"}
    assert events["item"].isin(dataset.catalogue.index.ids).all()
    assert events["user"].nunique() == 300
    start, end = SMALL.start_timestamp, SMALL.start_timestamp + SMALL.span_days * 86400
    assert events["timestamp"].between(start, end + 3600).all()


def test_catalogue_has_ids_categories_prices_brands_and_features(dataset):
    catalogue = dataset.catalogue
    items = catalogue.items

    assert items["item"].iloc[42] == "i00042"
    assert items["categories"].map(len).between(1, 2).all()
    assert items["categories"].map(len).eq(2).any()
    assert (items["price"] > 0).all()
    assert items["brand"].str.startswith("brand").all()
    # 20 category columns + log price + 8 latent columns.
    assert catalogue.features.shape == (600, 29)
    assert catalogue.feature_names[0] == "category_books"
    assert catalogue.feature_names[20] == "log_price"
    multi_hot = catalogue.features[:, :20]
    np.testing.assert_array_equal(multi_hot.sum(axis=1), items["categories"].map(len))


def test_prices_depend_on_the_category(dataset):
    items = dataset.catalogue.items
    primary = items["categories"].map(lambda c: c[0])

    median_by_category = np.log(items["price"]).groupby(primary).median()

    assert median_by_category.max() - median_by_category.min() > 1.0


def test_behaviour_funnel_is_about_100_20_4_1(dataset):
    counts = dataset.events["behaviour"].value_counts()

    assert 0.15 < counts["click"] / counts["view"] < 0.25
    assert 0.15 < counts["cart"] / counts["click"] < 0.25
    assert 0.18 < counts["purchase"] / counts["cart"] < 0.32


def test_stronger_behaviours_favour_the_users_own_categories(dataset):
    events = dataset.events.merge(
        dataset.catalogue.items[["item", "categories"]], on="item", how="left"
    )
    views = events[events["behaviour"] == "view"]
    favourite = (
        views.explode("categories").groupby("user")["categories"].agg(lambda c: c.mode().iloc[0])
    )
    in_favourite = [
        favourite[user] in categories
        for user, categories in zip(events["user"], events["categories"])
    ]
    events["in_favourite"] = in_favourite

    share = events.groupby("behaviour")["in_favourite"].mean()

    assert share["purchase"] > share["view"] + 0.05


def test_item_popularity_is_heavy_tailed(dataset):
    views = dataset.events.loc[dataset.events["behaviour"] == "view", "item"].value_counts()

    top_tenth_share = views.iloc[:60].sum() / views.sum()

    assert top_tenth_share > 0.4
    assert views.iloc[0] > 10 * views.median()


def test_events_per_user_are_heavy_tailed_with_a_minimum(dataset):
    per_user = dataset.events.groupby("user").size()

    assert per_user.min() >= SMALL.min_events_per_user
    assert per_user.max() > 5 * per_user.median()
    assert abs(per_user.mean() - 30) < 4


def category_drift(config):
    """Mean cosine between each user's early-half and late-half category histograms,
    minus the same between interleaved halves (which share the same time span)."""
    data = generate(config)
    views = data.events[data.events["behaviour"] == "view"]
    rows = data.catalogue.index.rows(views["item"])
    categories = data.catalogue.features[rows, : config.num_categories]
    users = views["user"].to_numpy()
    rank = views.groupby("user").cumcount().to_numpy()
    size = views.groupby("user")["user"].transform("size").to_numpy()

    def mean_cosine(first_half):
        frame = pd.DataFrame(categories).assign(user=users, half=first_half)
        histograms = frame.groupby(["user", "half"]).sum()
        early = histograms.xs(True, level="half").to_numpy()
        late = histograms.xs(False, level="half").to_numpy()
        norms = np.linalg.norm(early, axis=1) * np.linalg.norm(late, axis=1)
        return float(np.mean((early * late).sum(axis=1) / norms))

    return mean_cosine(rank % 2 == 0) - mean_cosine(rank < size / 2)


def test_tastes_drift_over_time():
    base = {"num_users": 300, "num_items": 600, "mean_events_per_user": 40, "seed": 2}

    drifting = category_drift(SyntheticConfig(drift=1.0, **base))
    steady = category_drift(SyntheticConfig(drift=0.0, **base))

    assert drifting > 0.05
    assert drifting > steady + 0.03


def recall_at_20(scores, seen, truth):
    scores = np.where(seen, -np.inf, scores)
    top = np.argpartition(-scores, 20, axis=1)[:, :20]
    return float(np.mean([np.isin(t, top[u]).mean() for u, t in enumerate(truth)]))


def test_held_out_items_are_predictable_beyond_popularity(dataset):
    interactions = BehaviourWeights().to_interactions(dataset.events, dataset.catalogue.index)
    train, test = temporal_split(interactions)
    users = sorted(test["user"].unique())
    n_items = len(dataset.catalogue)
    indptr, history = history_csr(train, users)
    seen = np.zeros((len(users), n_items), dtype=bool)
    seen[np.repeat(np.arange(len(users)), np.diff(indptr)), history] = True
    test_indptr, test_items = history_csr(test, users)
    truth = np.split(test_items, test_indptr[1:-1])
    popularity = np.bincount(train["item"], minlength=n_items).astype(float)
    categories = dataset.catalogue.features[:, : SMALL.num_categories]
    latent = dataset.catalogue.features[:, SMALL.num_categories + 1 :]

    by_popularity = np.tile(popularity, (len(users), 1))
    profile = seen @ categories
    profile /= profile.sum(axis=1, keepdims=True)
    by_category = np.log(profile @ categories.T + 0.01) + np.log1p(popularity)
    by_content = (seen @ latent) @ latent.T  # the latent features alone
    by_chance = np.random.default_rng(0).random((len(users), n_items))

    popularity_recall = recall_at_20(by_popularity, seen, truth)
    category_recall = recall_at_20(by_category, seen, truth)
    content_recall = recall_at_20(by_content, seen, truth)
    chance_recall = recall_at_20(by_chance, seen, truth)

    assert category_recall > 1.3 * popularity_recall
    assert content_recall > 2 * chance_recall


def test_to_folder_writes_canonical_csvs(dataset, tmp_path):
    to_folder(dataset, tmp_path / "site")

    catalogue = pd.read_csv(tmp_path / "site" / "catalogue.csv")
    events = pd.read_csv(tmp_path / "site" / "events.csv")

    assert list(catalogue.columns[:5]) == ["item", "title", "categories", "price", "brand"]
    assert list(catalogue.columns[5:]) == [f"f_{n}" for n in dataset.catalogue.feature_names]
    first = dataset.catalogue.items["categories"].iloc[0]
    assert catalogue["categories"].iloc[0] == "|".join(first)
    np.testing.assert_allclose(
        catalogue["f_log_price"], dataset.catalogue.features[:, 20], rtol=1e-6
    )
    assert tuple(events.columns) == EVENT_COLUMNS
    assert len(events) == len(dataset.events)
    assert events["timestamp"].tolist() == dataset.events["timestamp"].tolist()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mean_events_per_user": 5}, "mean_events_per_user .* is too small"),
        ({"num_items": 10, "num_categories": 20}, "more categories"),
        ({"drift": 1.5}, "drift must be between 0 and 1"),
        ({"num_users": 0}, "num_users must be at least 1"),
        ({"funnel_rates": (0.2, 1.0, 0.2)}, "funnel_rates must be three probabilities"),
    ],
)
def test_invalid_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**kwargs)
