"""The approximate candidate index: the MIPS-to-L2 reduction, exact re-scoring, filters, fallbacks, choice of path."""

import logging

import numpy as np
import pandas as pd
import pytest

from fedtower.data.schema import Catalogue
from fedtower.serving import Filters, Recommender, ServingConfig
from fedtower.serving import index as index_module
from fedtower.serving.index import CandidateIndex, default_lists, resolve_kind
from fedtower.serving.types import TableOptions
from tests import test_serving_sync
from tests.test_serving_sync import evaluate_round, newer_tower

pristine, trained = test_serving_sync.pristine, test_serving_sync.trained

N, DIM, USERS = 6000, 16, 40


def clustered_table(seed: int = 0):
    """Items around 60 taste centres (a trained table has such structure; a random one has none)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((60, DIM)).astype(np.float32)
    vectors = (centres[rng.integers(0, 60, N)] + 0.3 * rng.standard_normal((N, DIM))).astype(np.float32)
    bias = rng.normal(scale=0.3, size=N).astype(np.float32)
    return vectors, bias


def served(index: str, probes: int = 32, seed: int = 0) -> Recommender:
    vectors, bias = clustered_table(seed)
    rng = np.random.default_rng(seed + 1)
    ids = [f"i{j}" for j in range(N)]
    catalogue = Catalogue(pd.DataFrame({"item": ids, "title": ids,
                                        "categories": [("rare",) if j % 50 == 0 else ("common",) for j in range(N)],
                                        "price": np.round(rng.uniform(0, 100, N), 2), "brand": ""}))  # fmt: skip
    histories = {f"u{j}": rng.choice(N, 20, replace=False) for j in range(USERS)}
    free = rng.normal(scale=0.1, size=(USERS, DIM)).astype(np.float32)
    return Recommender(catalogue=catalogue, item_vectors=vectors, item_bias=bias, users=list(histories), free=free,
                       histories=histories, config=ServingConfig(index=index, index_probes=probes))  # fmt: skip


def test_searching_every_list_gives_the_exact_top_10_for_any_bias_weight():
    # Prepare: an index over a clustered table; queries with the bias weighted 1, 0.5 and -1 (novelty 2).
    vectors, bias = clustered_table()
    index = CandidateIndex(vectors, bias, lists=64, probes=4)
    rng = np.random.default_rng(3)
    for weight in (1.0, 0.5, -1.0):
        for _ in range(10):
            user = rng.standard_normal(DIM).astype(np.float32)
            # Execute: probe all 64 lists, so the only approximation left is none.
            got = index.candidates(user, weight, 10, probes=64)
            # Assert: the L2 search over the lifted points is exactly the inner-product top 10.
            exact = np.argsort(-(vectors @ user + weight * bias), kind="stable")[:10]
            assert set(got) == set(exact)


def test_the_index_serves_what_exact_scoring_serves_on_a_structured_table():
    # Prepare: the same users served exactly and through the index.
    exact, approximate = served("exact"), served("ivf")
    # Execute
    recall = np.mean([len({r.item for r in approximate.recommend(u, 10)} & {r.item for r in exact.recommend(u, 10)})
                      / 10 for u in exact.users])  # fmt: skip
    # Assert: near-exact recall, and the scores returned are the table's exact scores of those items.
    assert recall >= 0.95
    user = exact.users[0]
    picks = approximate.recommend(user, 10)
    rows = np.array([approximate.row_of_item(r.item) for r in picks])
    np.testing.assert_allclose([r.score for r in picks], approximate.table.vectors[rows]
                               @ approximate.user_vector(user) + approximate.table.bias[rows], rtol=1e-5)  # fmt: skip
    assert approximate.status()["search"]["kind"] == "ivf"


@pytest.mark.parametrize("options", [{"filters": Filters(categories=["rare"])}, {"filters": Filters(max_price=10.0)},
                                     {"diversity": 0.4}, {"category_cap": 3}, {"novelty": 1.0}])  # fmt: skip
def test_exclusions_filters_and_reranking_stay_exact_on_what_the_index_returns(options):
    # Prepare
    exact, approximate = served("exact"), served("ivf")
    for user in exact.users[:15]:
        # Execute
        got = approximate.recommend(user, 10, **options)
        want = exact.recommend(user, 10, **options)
        # Assert: as many items as exact scoring finds (a cap of 3 over two categories allows 6), none
        # seen, every one allowed by the filters, and mostly the exact answer.
        assert len(got) == len(want)
        rows = [approximate.row_of_item(r.item) for r in got]
        assert not set(rows) & set(approximate._history[approximate.row_of_user(user)].tolist())
        filters = options.get("filters")
        if filters is not None:
            assert approximate.filter_mask(filters)[rows].all()
        assert len({r.item for r in got} & {r.item for r in want}) >= 0.8 * len(want)


def test_a_filter_too_narrow_for_the_index_is_served_exactly_and_counted():
    # Prepare: only 5 items in stock, none of them likely among any user's candidates.
    approximate, exact = served("ivf", probes=2), served("exact")
    stock = Filters(available=[f"i{j}" for j in (11, 222, 3333, 4444, 5555)])
    user = exact.users[0]
    # Execute
    got = approximate.recommend(user, 3, filters=stock)
    # Assert: the exact answer, and status() says a query fell back.
    assert [r.item for r in got] == [r.item for r in exact.recommend(user, 3, filters=stock)]
    assert approximate.status()["search"]["fallbacks"] == 1


def test_auto_scores_small_catalogues_exactly_and_indexes_large_ones(monkeypatch):
    # Prepare / Execute / Assert: below the measured size auto is exact; above it, the index.
    assert resolve_kind("auto", index_module.AUTO_MIN_ITEMS - 1) == "exact"
    assert resolve_kind("auto", index_module.AUTO_MIN_ITEMS) == "ivf"
    assert served("auto").status()["search"] == {"kind": "exact"}
    monkeypatch.setattr(index_module, "AUTO_MIN_ITEMS", 1000)
    assert served("auto").status()["search"]["kind"] == "ivf"
    assert default_lists(10**6) == 4096 and default_lists(10**5) == 1024


def test_without_faiss_auto_falls_back_with_a_warning_and_ivf_is_refused(monkeypatch, caplog):
    monkeypatch.setattr(index_module, "faiss_module", lambda: None)
    with caplog.at_level(logging.WARNING, logger="fedtower.serving"):
        assert resolve_kind("auto", 10**7) == "exact"
    assert "faiss is not installed" in caplog.text
    with pytest.raises(ValueError, match="pip install faiss-cpu"):
        resolve_kind("ivf", 10)


@pytest.mark.parametrize(("field", "value", "message"), [("index", "hnsw", "index must be one of auto, exact, ivf"),
                                                         ("index_probes", 0, "index_probes must be a positive"),
                                                         ("index_lists", -1, "index_lists must be 0")])  # fmt: skip
def test_bad_index_settings_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        TableOptions(**{field: value})
    with pytest.raises(ValueError, match=message):
        ServingConfig(**{field: value})


def test_a_hot_reload_builds_a_new_index_for_the_new_snapshot(trained):
    # Prepare: a node's state served through the index; then an evaluation saves a newer tower.
    settings, state_dir = trained
    recommender = Recommender.from_state_dir(state_dir, index="ivf", index_probes=4)
    before = recommender.table.index
    evaluate_round(settings, newer_tower(settings))
    # Execute
    recommender.refresh()
    # Assert: the new table has its own index, built over the new vectors.
    after = recommender.table.index
    assert after is not None and after is not before
    user = recommender.users[0]
    vector = recommender.user_vector(user)
    probe_all = after.candidates(vector, 1.0, 5, probes=after.lists)
    exact = np.argsort(-(recommender.table.vectors @ vector + recommender.table.bias), kind="stable")[:5]
    assert set(probe_all) == set(exact)
