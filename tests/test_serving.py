"""Serving on the client: hand-built cases for ranking, explanations, re-ranking, bundles, cold start."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fedtower.data.schema import Catalogue
from fedtower.models.two_tower import TwoTower, TwoTowerConfig, pad_histories
from fedtower.serving import (
    Filters,
    ItemTable,
    QuantizedRows,
    Recommender,
    ServingConfig,
    UnknownItemError,
    UnknownUserError,
    top_k,
)
from fedtower.serving.pooling import user_vector
from fedtower.serving.rerank import cap_categories, mmr

# A 2-d world small enough to rank by hand. Rows: a b c d e f.
ITEMS = ["a", "b", "c", "d", "e", "f"]
VECTORS = np.array([[1, 0], [0, 1], [1, 1], [-1, 0], [0.9, 0.1], [0, -1]], dtype=np.float32)
CATEGORIES = [("X",), ("Y",), ("X", "Y"), ("Z",), ("X",), ("Z",)]
PRICES = [10.0, 20.0, 30.0, np.nan, 5.0, 50.0]
# Recency weights of a 2-item history (oldest first): exp(3 * (pos - 1) / 2), normalised.
W_OLD = math.exp(-1.5) / (1 + math.exp(-1.5))
W_NEW = 1 - W_OLD


def tiny_catalogue() -> Catalogue:
    return Catalogue(pd.DataFrame({"item": ITEMS, "title": [f"Title {i}" for i in ITEMS],
                                   "categories": CATEGORIES, "price": PRICES, "brand": [""] * 6}))  # fmt: skip


def tiny(precision: str = "fp32", bias=None) -> Recommender:
    """User 'u' has seen a; user 'v' has seen a then b; both free vectors are 0."""
    return Recommender(
        catalogue=tiny_catalogue(), item_vectors=VECTORS,
        item_bias=np.zeros(6, np.float32) if bias is None else np.asarray(bias, np.float32),
        users=["u", "v"], free=np.zeros((2, 2)), histories={"u": [0], "v": [0, 1]},
        config=ServingConfig(precision=precision),
    )  # fmt: skip


def ids(recs) -> list[str]:
    return [r.item for r in recs]


# ---------------------------------------------------------------- ranking, exclusion, filters


def test_whole_catalogue_ranking_excludes_seen_items_and_breaks_ties_by_row():
    # Prepare: u = (1, 0): scores a 1 (seen), b 0, c 1, d -1, e 0.9, f 0.
    recommender = tiny()
    # Execute
    recs = recommender.recommend("u", k=5)
    # Assert: a never appears; b and f tie at 0 and b (lower row) comes first.
    assert ids(recs) == ["c", "e", "b", "f", "d"]
    assert [r.score for r in recs] == pytest.approx([1.0, 0.9, 0.0, 0.0, -1.0])
    assert recs[0].title == "Title c" and recs[0].categories == ["X", "Y"]


def test_filters_by_category_price_and_availability():
    recommender = tiny()
    assert ids(recommender.recommend("u", 5, filters=Filters(categories=["Z"]))) == ["f", "d"]
    # d has no price, so any price bound drops it; c (30) is above 25.
    assert ids(recommender.recommend("u", 5, filters=Filters(min_price=0, max_price=25))) == ["e", "b"]
    assert ids(recommender.recommend("u", 5, filters=Filters(available=["d", "f", "b"]))) == ["b", "f", "d"]
    both = Filters(categories=["X"], max_price=20)
    assert ids(recommender.recommend("u", 5, filters=both)) == ["e"]


def test_bad_requests_are_value_errors_naming_the_field():
    recommender = tiny()
    with pytest.raises(UnknownUserError, match="Unknown user 'nobody'"):
        recommender.recommend("nobody")
    with pytest.raises(ValueError, match="k must be a positive integer"):
        recommender.recommend("u", k=0)
    with pytest.raises(ValueError, match="'min_price'.*above 'max_price'"):
        Filters(min_price=5, max_price=1)
    with pytest.raises(UnknownItemError, match="Field 'available'"):
        recommender.recommend("u", filters=Filters(available=["zzz"]))
    with pytest.raises(ValueError, match="no catalogue item is in category 'Q'"):
        recommender.recommend("u", filters=Filters(categories=["Q"]))
    with pytest.raises(ValueError, match="diversity must be between 0 and 1"):
        recommender.recommend("u", diversity=2.0)


def test_novelty_subtracts_the_released_item_bias():
    # Prepare: c is "popular" (bias 0.5), e is not: plain scores c 1.5, e 0.9.
    recommender = tiny(bias=[0, 0, 0.5, 0, 0, 0])
    assert ids(recommender.recommend("u", 2)) == ["c", "e"]
    # novelty 1 ranks by <u, v> alone (c 1.0 still first); novelty 2 gives c 1.0 - 0.5 = 0.5 < e 0.9.
    assert ids(recommender.recommend("u", 2, novelty=1.0)) == ["c", "e"]
    assert ids(recommender.recommend("u", 2, novelty=2.0)) == ["e", "c"]
    # The reported score stays the model's score.
    assert recommender.recommend("u", 2, novelty=2.0)[1].score == pytest.approx(1.5)


# ---------------------------------------------------------------- explanations


def test_explanations_are_the_exact_pooling_shares_of_the_score():
    # Prepare: v = W_OLD * a + W_NEW * b.
    recommender = tiny()
    # Execute
    for_c = recommender.explain("v", "c", top=2)
    for_e = recommender.explain("v", "e", top=2)
    # Assert: <a, c> = <b, c> = 1, so the newer b contributes more; for e, a (0.9) beats b (0.1).
    assert ids(for_c) == ["b", "a"]
    assert [x.contribution for x in for_c] == pytest.approx([W_NEW, W_OLD])
    assert ids(for_e) == ["a", "b"]
    assert [x.contribution for x in for_e] == pytest.approx([0.9 * W_OLD, 0.1 * W_NEW])
    assert for_e[0].weight == pytest.approx(W_OLD) and for_e[0].similarity == pytest.approx(0.9 / math.hypot(0.9, 0.1))
    # The shares add up to the score (free vector 0, bias 0).
    score = next(r.score for r in recommender.recommend("v", 4) if r.item == "e")
    assert sum(x.contribution for x in for_e) == pytest.approx(score)


def test_recommend_with_explain_attaches_the_top_contributions():
    recs = tiny().recommend("v", 1, explain=True)
    assert ids(recs) == ["c"] and ids(recs[0].explanation) == ["b", "a"]
    assert recs[0].to_dict()["explanation"][0]["item"] == "b"


def test_without_pooling_explanations_fall_back_to_item_similarity():
    recommender = tiny()
    recommender.config = ServingConfig(pool_history=False)
    out = recommender.explain("v", "e", top=2)
    assert ids(out) == ["a", "b"] and out[0].method == "similarity"
    assert out[0].contribution == pytest.approx(0.9 / math.hypot(0.9, 0.1))


def test_numpy_user_vector_matches_the_torch_user_tower():
    # Prepare: a random model with mean and attention pooling, free vectors set.
    for pooling in ("mean", "attention"):
        torch.manual_seed(0)
        model = TwoTower(TwoTowerConfig(num_items=30, num_users=3, dim=8, pooling=pooling))
        with torch.no_grad():
            model.user_tower.embedding.weight.normal_(std=0.3)
        histories = [[3, 5, 7, 9], [1], [2, 4, 6, 8, 10, 12]]
        with torch.no_grad():
            vectors, _ = model.item_table()
            expected = model.user_vectors(torch.arange(3), pad_histories(histories, 50), vectors).numpy()
        free = model.user_tower.embedding.weight.detach().numpy()
        # Execute / Assert
        for row, history in enumerate(histories):
            got, _ = user_vector(vectors.numpy()[history], free[row], recency=3.0, pooling=pooling)
            np.testing.assert_allclose(got, expected[row], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- re-ranking


def test_mmr_on_a_hand_computed_case():
    # Prepare: items 0 and 1 point the same way, item 2 is orthogonal; relevance 1, 0.9, 0.
    candidates = np.array([10, 11, 12])
    relevance = np.array([1.0, 0.9, 0.0])
    unit = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # After picking 0: item 1 is worth (1 - l) 0.9 - l, item 2 is worth 0; they cross at l = 0.9 / 1.9.
    assert mmr(candidates, relevance, unit, 3, 0.0).tolist() == [10, 11, 12]
    assert mmr(candidates, relevance, unit, 3, 0.47).tolist() == [10, 11, 12]
    assert mmr(candidates, relevance, unit, 3, 0.48).tolist() == [10, 12, 11]


def test_diversity_through_recommend_moves_a_near_duplicate_down():
    # u: c (1.0), e (0.9), b (0), f (0), d (-1). e is nearly a; c is between.
    recommender = tiny()
    plain = ids(recommender.recommend("u", 3))
    diverse = ids(recommender.recommend("u", 3, diversity=0.7))
    assert plain == ["c", "e", "b"]
    assert diverse[0] == "c" and diverse != plain


def test_category_caps():
    # Hand case: cap 1, items in X, X|Y, Y, Z, Z.
    categories = [("X",), ("X", "Y"), ("Y",), ("Z",), ("Z",), ()]
    assert cap_categories(np.array([0, 1, 2, 3, 4, 5]), categories, 1, 10).tolist() == [0, 2, 3, 5]
    assert cap_categories(np.array([1, 0, 2, 3, 4]), categories, 2, 3).tolist() == [1, 0, 2]
    # Through recommend: c (X, Y) fills X and Y, so e and b are skipped; f fills Z; only 2 items exist.
    assert ids(tiny().recommend("u", 3, category_cap=1)) == ["c", "f"]


# ---------------------------------------------------------------- bundles and cold start


def test_complete_a_basket():
    recommender = tiny()
    # query = u + b = (1, 1); a is seen, b is in the basket, c shares category Y with b.
    assert ids(recommender.complete("u", ["b"], 3)) == ["e", "d", "f"]
    # Asked for: same category allowed, c scores 2.
    assert ids(recommender.complete("u", ["b"], 2, allow_same_category=True)) == ["c", "e"]
    with pytest.raises(UnknownItemError, match=r"basket\[1\]"):
        recommender.complete("u", ["b", "nope"])
    with pytest.raises(ValueError, match="non-empty list"):
        recommender.complete("u", [])


def test_cold_start_pools_a_new_users_few_events():
    recommender = tiny()
    recommender.config = ServingConfig(cold_prior=False)  # pooling alone
    # One event: the user vector is b itself.
    assert ids(recommender.recommend_for_history(["b"], 2)) == ["c", "e"]
    # Two events: W_OLD a + W_NEW b; c = 1, e = 0.9 W_OLD + 0.1 W_NEW, d = -W_OLD.
    recs = recommender.recommend_for_history([{"item": "a"}, {"item": "b"}], 3)
    assert ids(recs) == ["c", "e", "d"]
    assert recs[1].score == pytest.approx(0.9 * W_OLD + 0.1 * W_NEW)
    with pytest.raises(UnknownItemError, match=r"events\[0\].item"):
        recommender.recommend_for_history(["zzz"])


def test_cold_start_shrinks_towards_the_site_prior():
    # Prepare: the prior is the mean of u = a = (1, 0) and v = (W_OLD, W_NEW).
    recommender = tiny()
    prior = np.array([(1 + W_OLD) / 2, W_NEW / 2])
    np.testing.assert_allclose(recommender.site_prior(), prior, rtol=1e-6)
    # Execute: one event b, shrink 2: vector = prior + 1/3 b.
    recs = recommender.recommend_for_history(["b"], 5)
    # Assert: scores are <prior + (0, 1/3), item>.
    vector = prior + np.array([0, 1 / 3])
    expected = {item: float(VECTORS[row] @ vector) for row, item in enumerate(ITEMS) if item != "b"}
    assert ids(recs) == sorted(expected, key=lambda i: -expected[i])
    assert [r.score for r in recs] == pytest.approx(sorted(expected.values(), reverse=True), rel=1e-6)


# ---------------------------------------------------------------- top-k and quantization


def test_top_k_is_exact_with_ties_and_excluded_items():
    # Prepare: 50k scores with many ties and -inf holes, so the two-stage path runs.
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 2000, 50_000).astype(np.float32)
    scores[rng.choice(50_000, 5_000, replace=False)] = -np.inf
    for k in (1, 10, 37):
        # Expected: best score first, lower row first among ties, never -inf.
        order = np.lexsort((np.arange(scores.size), -scores))[:k]
        assert top_k(scores, k).tolist() == order.tolist()
    assert top_k(np.array([-np.inf, 1.0, -np.inf]), 5).tolist() == [1]


def test_int8_rows_are_within_half_a_scale_step_and_score_within_the_bound():
    # Prepare
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(5000, 64)).astype(np.float32)
    vectors[7] = 0.0
    bias = rng.normal(size=5000).astype(np.float32)
    user = rng.normal(size=64).astype(np.float32)
    # Execute
    rows = QuantizedRows.from_vectors(vectors)
    table = ItemTable(vectors, bias, "int8")
    # Assert: element error <= scale / 2, zero rows exact, a quarter of the bytes (+ one scale per row).
    error = np.abs(rows.dequantize() - vectors)
    assert (error <= rows.scale[:, None] / 2 + 1e-7).all()
    assert (rows.dequantize()[7] == 0).all()
    assert rows.nbytes == 5000 * 64 + 5000 * 4
    # Scores: quantization (|u|_1 scale / 2), plus bfloat16 rounding of the user vector and the
    # output (relative 2^-8 each) when torch's int8 kernel is used.
    exact = vectors @ user + bias
    dequantized = rows.dequantize()
    rounding = 2**-8 * (np.abs(dequantized) @ np.abs(user) + np.abs(exact - bias)) * 1.01
    bound = np.abs(user).sum() * rows.scale / 2 + rounding + 1e-5
    assert (np.abs(table.scores(user) - exact) <= bound + 2**-8 * np.abs(exact)).all()
    assert ItemTable(vectors, bias, "fp16").nbytes == 5000 * 64 * 2 + 5000 * 4


def test_quantized_tables_rank_the_tiny_catalogue_identically():
    for precision in ("fp16", "int8"):
        assert ids(tiny(precision).recommend("u", 5)) == ["c", "e", "b", "f", "d"]


def test_sampled_refit_moves_the_user_like_the_full_one_on_a_large_catalogue():
    # Prepare: 50k items, a user with 20 items; the sampled path runs above 4 x 4096 items.
    from fedtower.serving.pooling import refit_free, softmax_loss

    rng = np.random.default_rng(3)
    vectors = rng.normal(scale=0.3, size=(50_000, 16)).astype(np.float32)
    bias = rng.normal(scale=0.1, size=50_000).astype(np.float32)
    targets = rng.choice(50_000, 20, replace=False)
    weights = np.ones(20, dtype=np.float32)
    pooled = vectors[targets].mean(0)
    free = np.zeros(16, dtype=np.float32)
    options = {"steps": 5, "lr": 0.05, "l2": 1.0}
    # Execute
    full = refit_free(free, pooled, vectors, bias, targets, weights, **options)
    sampled = refit_free(free, pooled, vectors, bias, targets, weights, sample=4096, **options)
    # Assert: both lower the full loss, and point the same way.
    before = softmax_loss(pooled + free, vectors, bias, targets, weights)
    assert softmax_loss(pooled + sampled, vectors, bias, targets, weights) < before
    assert softmax_loss(pooled + full, vectors, bias, targets, weights) < before
    assert float(full @ sampled) / (np.linalg.norm(full) * np.linalg.norm(sampled)) > 0.9
