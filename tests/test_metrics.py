"""Ranking metrics: hand-computed values, edge cases, and the merge property."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtower.metrics import (
    RankingSums,
    auc,
    coverage_at_k,
    evaluate_scores,
    format_table,
    intra_list_diversity,
    ndcg_at_k,
    novelty_at_k,
    popularity_counts,
    precision_at_k,
    rank_top_k,
    recall_at_k,
    reciprocal_rank,
    sampled_hit_and_ndcg,
)

INV_LOG2_3 = 1.0 / math.log2(3)  # discount of rank 2: 1/log2(2+1) ~= 0.63093


# ---------------------------------------------------------------- per-user metrics


def test_recall_precision_ndcg_on_one_hit_at_rank_two():
    # Prepare: ranked [3, 1, 7], relevant {1, 9}, k = 3 -> one hit (item 1) at rank 2.
    ranked, relevant = np.array([3, 1, 7]), {1, 9}

    # Execute
    recall = recall_at_k(ranked, relevant, k=3)
    precision = precision_at_k(ranked, relevant, k=3)
    ndcg = ndcg_at_k(ranked, relevant, k=3)

    # Assert: recall 1/2, precision 1/3, DCG = 1/log2 3, IDCG (2 relevant) = 1 + 1/log2 3.
    assert recall == pytest.approx(0.5, abs=1e-12)
    assert precision == pytest.approx(1 / 3, abs=1e-12)
    assert ndcg == pytest.approx(INV_LOG2_3 / (1 + INV_LOG2_3), abs=1e-12)


def test_metrics_are_zero_without_hits():
    # Prepare: no ranked item is relevant.
    ranked, relevant = [0, 1, 2], [5]

    # Execute
    values = [f(ranked, relevant, 3) for f in (recall_at_k, precision_at_k, ndcg_at_k)]

    # Assert: no hit -> 0 for all, and no relevant item anywhere -> RR 0.
    assert values == [0.0, 0.0, 0.0]
    assert reciprocal_rank(ranked, relevant) == 0.0


def test_only_the_first_k_positions_count():
    # Prepare: the only relevant item sits at rank 3, k = 2.
    ranked, relevant = [4, 5, 6], [6]

    # Execute
    values = [f(ranked, relevant, 2) for f in (recall_at_k, precision_at_k, ndcg_at_k)]

    # Assert: the hit is beyond k, so it does not count.
    assert values == [0.0, 0.0, 0.0]


def test_padded_list_shorter_than_k_divides_precision_by_k():
    # Prepare: one candidate (5) then -1 padding; relevant {5}; k = 3.
    ranked = [5, -1, -1]

    # Execute
    recall = recall_at_k(ranked, [5], 3)
    precision = precision_at_k(ranked, [5], 3)
    ndcg = ndcg_at_k(ranked, [5], 3)

    # Assert: 1 hit / 1 relevant, 1 hit / k = 1/3, DCG 1 over IDCG of min(1, 3) = 1 hit = 1.
    assert (recall, ndcg) == (1.0, 1.0)
    assert precision == pytest.approx(1 / 3, abs=1e-12)


def test_ndcg_ideal_is_capped_at_k_hits():
    # Prepare: 5 relevant items, k = 2, both top positions are hits.
    ranked, relevant = [0, 1, 2], [0, 1, 7, 8, 9]

    # Execute
    ndcg = ndcg_at_k(ranked, relevant, 2)

    # Assert: DCG = 1 + 1/log2 3 equals IDCG over min(5, 2) = 2 hits -> 1.
    assert ndcg == pytest.approx(1.0, abs=1e-12)


def test_reciprocal_rank_uses_the_full_list():
    # Prepare: first relevant item (8) at rank 3 of the untruncated list.
    ranked, relevant = [4, 2, 8, 6], {8, 6}

    # Execute
    rr = reciprocal_rank(ranked, relevant)

    # Assert: 1/3.
    assert rr == pytest.approx(1 / 3, abs=1e-12)


def test_per_user_metrics_reject_empty_relevant_and_repeated_items():
    # Prepare / Execute / Assert: both inputs make the metric meaningless.
    with pytest.raises(ValueError, match="relevant set is empty"):
        recall_at_k([1, 2], [], 2)
    with pytest.raises(ValueError, match="repeats an item"):
        precision_at_k([1, 1], [1], 2)
    with pytest.raises(ValueError, match="positive integer"):
        ndcg_at_k([1], [1], 0)


def test_auc_counts_ties_as_half_and_ignores_excluded_items():
    # Prepare: scores [0.9, 0.5, 0.5, 0.1], relevant {1}.
    scores = np.array([0.9, 0.5, 0.5, 0.1])

    # Execute
    with_exclusion = auc(scores, [1], exclude=[0])
    without_exclusion = auc(scores, [1])

    # Assert: excluding item 0, pairs (1,2) tie -> 1/2 and (1,3) right -> 1: 1.5 / 2 = 0.75.
    # Keeping item 0, pair (1,0) is wrong -> 0: (0 + 0.5 + 1) / 3 = 0.5.
    assert with_exclusion == pytest.approx(0.75, abs=1e-12)
    assert without_exclusion == pytest.approx(0.5, abs=1e-12)


def test_auc_is_nan_without_a_negative_candidate():
    # Prepare: every candidate is relevant once item 2 is excluded.
    scores = np.array([0.1, 0.2, 0.3])

    # Execute
    value = auc(scores, [0, 1], exclude=[2])

    # Assert: no (relevant, non-relevant) pair exists.
    assert math.isnan(value)


# ---------------------------------------------------------------- sampled protocol


def test_sampled_ties_rank_the_positive_below_the_negative():
    # Prepare: positive 0.5; negatives 0.7 and 0.5 (a tie) rank above it, 0.2 below.
    negatives = [0.7, 0.5, 0.2]

    # Execute
    hit, ndcg = sampled_hit_and_ndcg(0.5, negatives, k=10)

    # Assert: rank = 1 + 2 = 3 -> hit 1, NDCG = 1/log2(4) = 0.5.
    assert (hit, ndcg) == (1.0, 0.5)


def test_sampled_constant_model_gets_nothing():
    # Prepare: a model that scores everything the same, 1 positive vs 99 negatives.
    negatives = np.zeros(99)

    # Execute
    hit, ndcg = sampled_hit_and_ndcg(0.0, negatives, k=10)

    # Assert: pessimistic ties put the positive at rank 100 > 10.
    assert (hit, ndcg) == (0.0, 0.0)


def test_sampled_batch_gives_one_value_per_user():
    # Prepare: user 0's positive beats both negatives (rank 1); user 1's is beaten by
    # both (rank 3); k = 2.
    positives = np.array([0.9, 0.1])
    negatives = np.array([[0.2, 0.3], [0.5, 0.6]])

    # Execute
    hit, ndcg = sampled_hit_and_ndcg(positives, negatives, k=2)

    # Assert: hits [1, 0]; NDCG [1/log2 2 = 1, 0].
    np.testing.assert_array_equal(hit, [1.0, 0.0])
    np.testing.assert_array_equal(ndcg, [1.0, 0.0])


# ---------------------------------------------------------------- top k


def test_rank_top_k_breaks_ties_by_lower_row_and_skips_excluded():
    # Prepare: item scores 1, 3, 3, 2, 3; item 2 (a 3) is excluded.
    scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0]])

    # Execute
    top = rank_top_k(scores, [np.array([2])], k=3)

    # Assert: the 3s at rows 1 and 4 (lower row first), then the 2 at row 3.
    np.testing.assert_array_equal(top, [[1, 4, 3]])
    assert top.dtype == np.int64


def test_rank_top_k_pads_when_k_exceeds_the_candidates():
    # Prepare: 5 items, 1 excluded -> 4 candidates; k = 6.
    scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0]])

    # Execute
    top = rank_top_k(scores, [[2]], k=6)

    # Assert: the 4 candidates best first ([1, 4, 3, 0]), then two -1 pads.
    np.testing.assert_array_equal(top, [[1, 4, 3, 0, -1, -1]])


def test_excluded_items_rank_below_minus_infinity():
    # Prepare: item 0 scored -inf is a candidate; item 1 (score 5) is excluded.
    scores = np.array([[-np.inf, 5.0]])

    # Execute
    top = rank_top_k(scores, [[1]], k=2)

    # Assert: the -inf candidate is listed and the excluded item never is.
    np.testing.assert_array_equal(top, [[0, -1]])


def test_rank_top_k_accepts_csr_like_exclusions():
    # Prepare: user 0 excludes {0}, user 1 excludes {1, 2}, as CSR indptr/indices.
    scores = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    csr = SimpleNamespace(indptr=np.array([0, 1, 3]), indices=np.array([0, 1, 2]))

    # Execute
    top = rank_top_k(scores, csr, k=2)

    # Assert: user 0 -> [1, 2]; user 1 has only item 0 left -> [0, -1].
    np.testing.assert_array_equal(top, [[1, 2], [0, -1]])


def test_rank_top_k_rejects_bad_input():
    # Prepare / Execute / Assert: NaN scores, an out-of-catalogue row, a wrong user count.
    with pytest.raises(ValueError, match="NaN"):
        rank_top_k(np.array([[np.nan, 1.0]]), None, 1)
    with pytest.raises(ValueError, match="outside the catalogue of 2 items"):
        rank_top_k(np.ones((1, 2)), [[2]], 1)
    with pytest.raises(ValueError, match="one array per user"):
        rank_top_k(np.ones((2, 2)), [[0]], 1)


def _reference_ranking(scores_row: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """Full ranking by (score descending, row ascending) over non-excluded items."""
    rows = np.setdiff1d(np.arange(scores_row.size), excluded)
    return rows[np.lexsort((rows, -scores_row[rows]))]


# Small integer scores make ties common, which is where ranking bugs hide.
blocks = st.tuples(
    st.integers(1, 12),  # users
    st.integers(1, 15),  # items
    st.integers(1, 18),  # k
    st.integers(0, 2**32 - 1),  # seed
)


def _random_block(num_users: int, num_items: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    scores = rng.integers(-3, 4, size=(num_users, num_items)).astype(np.float64)
    exclude = [np.flatnonzero(rng.random(num_items) < 0.3) for _ in range(num_users)]
    # About one user in five has no relevant item and must be skipped.
    relevant = [
        np.flatnonzero(rng.random(num_items) < 0.3) if rng.random() < 0.8 else np.array([], int)
        for _ in range(num_users)
    ]
    return {
        "scores": scores,
        "exclude": exclude,
        "relevant": relevant,
        "popularity": rng.integers(0, 6, size=num_items),
        "num_popularity_users": 5,
        # Some all-zero rows exercise the zero-vector convention.
        "item_vectors": rng.integers(0, 2, size=(num_items, 3)).astype(np.float64),
    }


@settings(max_examples=60, deadline=None)
@given(blocks)
def test_rank_top_k_matches_a_full_lexicographic_sort(block):
    # Prepare
    num_users, num_items, k, seed = block
    data = _random_block(num_users, num_items, seed)

    # Execute
    top = rank_top_k(data["scores"], data["exclude"], k)

    # Assert: each row is the reference ranking's first k items, padded with -1.
    for user in range(num_users):
        expected = _reference_ranking(data["scores"][user], data["exclude"][user])[:k]
        padded = np.concatenate([expected, np.full(k - expected.size, -1)])
        np.testing.assert_array_equal(top[user], padded)


# ---------------------------------------------------------------- catalogue level


def test_popularity_counts_per_item():
    # Prepare: items 0, 2, 2, 5 in a catalogue of 6.
    train_items = np.array([0, 2, 2, 5])

    # Execute
    counts = popularity_counts(train_items, 6)

    # Assert
    np.testing.assert_array_equal(counts, [1, 0, 2, 0, 0, 1])
    with pytest.raises(ValueError, match="outside the catalogue"):
        popularity_counts([6], 6)


def test_coverage_and_novelty_by_hand():
    # Prepare: lists [0, 1] and [1, 2]; 5 items; popularity [3, 1, 0, 0, 0] over 3 users.
    top = np.array([[0, 1], [1, 2]])
    popularity = np.array([3, 1, 0, 0, 0])

    # Execute
    coverage = coverage_at_k(top, 5)
    novelty = novelty_at_k(top, popularity, 3)

    # Assert: items {0, 1, 2} of 5 -> 0.6. Per item -log2((p+1)/4): item 0 -> 0,
    # item 1 -> 1 (twice), item 2 -> 2; mean over 4 recommendations = 4/4 = 1.
    assert coverage == pytest.approx(0.6, abs=1e-12)
    assert novelty == pytest.approx(1.0, abs=1e-12)


def test_intra_list_diversity_by_hand():
    # Prepare: vectors (1,0), (0,1), (1,1), (0,0).
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])

    # Execute
    three = intra_list_diversity([0, 1, 2], vectors)
    with_zero = intra_list_diversity([0, 3, -1], vectors)
    single = intra_list_diversity([2, -1], vectors)

    # Assert: pairs (0,1) cos 0 -> 1, (0,2) and (1,2) cos 1/sqrt2 -> 1 - 1/sqrt2;
    # mean = (3 - sqrt2) / 3. A zero vector has cosine 0 -> distance 1. One item -> NaN.
    assert three == pytest.approx((3 - math.sqrt(2)) / 3, abs=1e-12)
    assert with_zero == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(single)


# ---------------------------------------------------------------- evaluate_scores


def _hand_block() -> dict:
    return {
        "scores": np.array(
            [
                [0.4, 0.3, 0.2, 0.1],  # user A: exclude {0}, relevant {2}
                [0.1, 0.2, 0.3, 0.4],  # user B: nothing excluded, relevant {0, 3}
                [0.5, 0.5, 0.5, 0.5],  # user C: no relevant item -> skipped
            ]
        ),
        "exclude": [np.array([0]), np.array([], int), np.array([], int)],
        "relevant": [np.array([2]), np.array([0, 3]), np.array([], int)],
        "popularity": np.array([3, 1, 0, 2]),
        "num_popularity_users": 3,
        "item_vectors": np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
    }


def test_evaluate_scores_by_hand():
    # Prepare
    data = _hand_block()

    # Execute
    metrics = evaluate_scores(**data, k=2).finalize()

    # Assert, per user (k = 2):
    # A: ranking [1, 2, 3], top [1, 2], hit at rank 2: recall 1, precision 1/2,
    #    NDCG (1/log2 3) / 1, RR 1/2, AUC: 2 (0.2) vs 1 (0.3) wrong, vs 3 (0.1) right -> 1/2.
    # B: ranking [3, 2, 1, 0], top [3, 2], hit at rank 1: recall 1/2, precision 1/2,
    #    NDCG 1 / (1 + 1/log2 3), RR 1, AUC: 3 beats 1 and 2, 0 loses to both -> 2/4.
    # Coverage: {1, 2, 3} of 4 = 0.75. Novelty -log2((p+1)/4): item 1 -> 1, item 2 -> 2,
    #    item 3 -> 2 - log2 3; A [1, 2] + B [3, 2] -> (1 + 2 + 2 - log2 3 + 2) / 4.
    # Diversity: A (1,0)-(0,1) -> 1; B (1,1)-(0,1) -> 1 - 1/sqrt2; mean over 2 users.
    expected = {
        "recall@2": 0.75,
        "precision@2": 0.5,
        "ndcg@2": (INV_LOG2_3 + 1 / (1 + INV_LOG2_3)) / 2,
        "mrr": 0.75,
        "auc": 0.5,
        "hr@2": 1.0,
        "coverage@2": 0.75,
        "novelty@2": (7 - math.log2(3)) / 4,
        "diversity@2": (2 - 1 / math.sqrt(2)) / 2,
        "users": 2,
    }
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name


def test_evaluate_scores_counts_skipped_users():
    # Prepare
    data = _hand_block()

    # Execute
    sums = evaluate_scores(**data, k=2)

    # Assert: user C had no relevant item.
    assert (sums.users, sums.skipped_users) == (2, 1)


def test_evaluate_scores_without_optional_inputs_reports_nan():
    # Prepare: no popularity and no item vectors.
    data = _hand_block()

    # Execute
    metrics = evaluate_scores(data["scores"], exclude=None, relevant=data["relevant"], k=2)
    metrics = metrics.finalize()

    # Assert: novelty and diversity have nothing to average; the rest are defined.
    assert math.isnan(metrics["novelty@2"]) and math.isnan(metrics["diversity@2"])
    assert metrics["recall@2"] >= 0.0


def test_evaluate_scores_rejects_inconsistent_popularity():
    # Prepare
    data = _hand_block()

    # Execute / Assert: an item cannot have more users than there are training users,
    # and popularity without its user count is ambiguous.
    with pytest.raises(ValueError, match="count each user at most once"):
        evaluate_scores(**{**data, "num_popularity_users": 2}, k=2)
    with pytest.raises(ValueError, match="pass both or neither"):
        evaluate_scores(**{**data, "num_popularity_users": None}, k=2)


def test_mrr_is_not_truncated_at_k():
    # Prepare: the only relevant item ranks 4th, k = 1.
    scores = np.array([[0.9, 0.8, 0.7, 0.6]])

    # Execute
    metrics = evaluate_scores(scores, exclude=None, relevant=[[3]], k=1).finalize()

    # Assert: MRR = 1/4 although recall@1 = 0.
    assert metrics["mrr"] == pytest.approx(0.25, abs=1e-12)
    assert metrics["recall@1"] == 0.0


@settings(max_examples=60, deadline=None)
@given(blocks)
def test_evaluate_scores_agrees_with_the_per_user_functions(block):
    # Prepare
    num_users, num_items, k, seed = block
    data = _random_block(num_users, num_items, seed)
    users = [u for u in range(num_users) if data["relevant"][u].size]

    # Execute
    metrics = evaluate_scores(**data, k=k).finalize()

    # Assert: the vectorised block equals the plain per-user definitions, averaged.
    rankings = {u: _reference_ranking(data["scores"][u], data["exclude"][u]) for u in users}
    top = rank_top_k(data["scores"][users], [data["exclude"][u] for u in users], k)

    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return float(np.mean(values)) if values else math.nan

    expected = {
        f"recall@{k}": mean([recall_at_k(rankings[u], data["relevant"][u], k) for u in users]),
        f"precision@{k}": mean(
            [precision_at_k(rankings[u], data["relevant"][u], k) for u in users]
        ),
        f"ndcg@{k}": mean([ndcg_at_k(rankings[u], data["relevant"][u], k) for u in users]),
        "mrr": mean([reciprocal_rank(rankings[u], data["relevant"][u]) for u in users]),
        "auc": mean(
            [auc(data["scores"][u], data["relevant"][u], data["exclude"][u]) for u in users]
        ),
        f"hr@{k}": mean(
            [float(recall_at_k(rankings[u], data["relevant"][u], k) > 0) for u in users]
        ),
        f"coverage@{k}": coverage_at_k(top, num_items) if users else 0.0,
        f"novelty@{k}": novelty_at_k(top, data["popularity"], 5) if users else math.nan,
        f"diversity@{k}": mean([intra_list_diversity(row, data["item_vectors"]) for row in top]),
        "users": len(users),
    }
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(metrics[name]), name
        else:
            assert metrics[name] == pytest.approx(value, abs=1e-12), name


# ---------------------------------------------------------------- merging


def _split(data: dict, cuts: list[int]) -> list[dict]:
    """The block's users cut into consecutive groups at the given user indices."""
    edges = [0, *cuts, data["scores"].shape[0]]
    parts = []
    for start, stop in itertools.pairwise(edges):
        part = dict(data)
        part["scores"] = data["scores"][start:stop]
        part["exclude"] = data["exclude"][start:stop]
        part["relevant"] = data["relevant"][start:stop]
        parts.append(part)
    return parts


def _assert_same_metrics(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(actual[name]), name
        else:
            assert actual[name] == pytest.approx(value, abs=1e-12), name


def test_one_user_and_ninety_nine_users_merge_to_the_whole():
    # Prepare: 100 users over 40 items, split 1 + 99.
    data = _random_block(100, 40, seed=7)
    whole = evaluate_scores(**data, k=5).finalize()
    first, rest = _split(data, [1])

    # Execute
    merged = (evaluate_scores(**first, k=5) + evaluate_scores(**rest, k=5)).finalize()

    # Assert: a mean over users, not a mean of the two group means.
    _assert_same_metrics(merged, whole)


@settings(max_examples=60, deadline=None)
@given(blocks, st.lists(st.integers(0, 12), max_size=4))
def test_any_split_into_user_groups_merges_to_the_whole(block, cuts):
    # Prepare
    num_users, num_items, k, seed = block
    data = _random_block(num_users, num_items, seed)
    cuts = sorted({cut for cut in cuts if 0 < cut < num_users})
    whole = evaluate_scores(**data, k=k)

    # Execute
    merged = sum((evaluate_scores(**part, k=k) for part in _split(data, cuts)), RankingSums())

    # Assert: counts merge exactly; every finalized metric matches the whole block.
    np.testing.assert_array_equal(merged.item_counts, whole.item_counts)
    assert (merged.users, merged.skipped_users) == (whole.users, whole.skipped_users)
    if whole.users:
        _assert_same_metrics(merged.finalize(), whole.finalize())


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_merge_is_associative_with_an_identity(seed):
    # Prepare: three blocks over the same 9-item catalogue.
    a, b, c = (evaluate_scores(**_random_block(4, 9, seed + i), k=3) for i in range(3))
    empty = RankingSums()

    # Execute
    left, right = (a + b) + c, a + (b + c)

    # Assert: grouping does not matter (up to float rounding); the empty sums change nothing.
    _assert_same_metrics(left.finalize(), right.finalize())
    assert left.item_counts.tolist() == right.item_counts.tolist()
    assert empty + a == a and a + empty == a


def test_merging_different_catalogues_or_k_is_an_error():
    # Prepare
    small = evaluate_scores(np.ones((1, 3)), exclude=None, relevant=[[0]], k=2)
    large = evaluate_scores(np.ones((1, 4)), exclude=None, relevant=[[0]], k=2)
    other_k = evaluate_scores(np.ones((1, 3)), exclude=None, relevant=[[0]], k=1)

    # Execute / Assert
    with pytest.raises(ValueError, match="catalogues of 3 and 4 items"):
        small + large
    with pytest.raises(ValueError, match="k=2 and k=1"):
        small + other_k
    with pytest.raises(ValueError, match="empty"):
        RankingSums().finalize()


def test_sums_round_trip_through_json():
    # Prepare
    sums = evaluate_scores(**_hand_block(), k=2)

    # Execute
    restored = RankingSums.from_dict(json.loads(json.dumps(sums.to_dict())))

    # Assert: identical sums, and the recommendation counts travel sparsely
    # (A got [1, 2], B got [3, 2] -> rows 1, 2, 3 with counts 1, 2, 1).
    assert restored == sums
    np.testing.assert_array_equal(restored.item_counts, [0, 1, 2, 1])
    assert sums.to_dict()["recommended_rows"] == [1, 2, 3]
    assert sums.to_dict()["recommended_counts"] == [1, 2, 1]


def test_from_dict_rejects_incomplete_or_inconsistent_payloads():
    # Prepare
    payload = evaluate_scores(**_hand_block(), k=2).to_dict()

    # Execute / Assert
    with pytest.raises(ValueError, match="missing users"):
        RankingSums.from_dict({name: v for name, v in payload.items() if name != "users"})
    with pytest.raises(ValueError, match="must lie in 0..3"):
        RankingSums.from_dict({**payload, "recommended_rows": [1, 2, 9]})


# ---------------------------------------------------------------- reporting


def test_format_table_aligns_names_and_values():
    # Prepare
    metrics = {"recall@20": 0.11923, "mrr": math.nan, "users": 610}

    # Execute
    table = format_table(metrics, title="Central")

    # Assert: names padded to the widest name (9) + 2, values right-aligned to the
    # widest value ("0.1192", 6 chars) -> 17 columns.
    assert table == (
        "Central\n-----------------\nrecall@20  0.1192\nmrr           n/a\nusers         610"
    )
