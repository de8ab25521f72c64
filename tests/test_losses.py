"""Losses and negative sampling: hand-computed values and the never-the-positive property."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtower.models.losses import (
    bpr_loss,
    candidate_loss,
    sample_negatives,
    sampled_softmax_loss,
)
from fedtower.models.two_tower import softmax_cross_entropy

# Column 0 is the positive. Row 0 ranks it first, row 1 last.
SCORES = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
LOG_SUM_EXP_012 = math.log(1 + math.e + math.e**2)  # log(e^0 + e^1 + e^2) = 2.407606


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------- loss values


def test_sampled_softmax_hand_computed():
    # Prepare: loss = logsumexp(row) - row[0].
    # row 0: 2.407606 - 2 = 0.407606; row 1: 2.407606 - 0 = 2.407606.
    expected = torch.tensor([LOG_SUM_EXP_012 - 2.0, LOG_SUM_EXP_012])

    # Execute
    loss = sampled_softmax_loss(SCORES)

    # Assert: one value per row.
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, expected)
    assert loss[0].item() == pytest.approx(0.407606, abs=1e-6)


def test_sampled_softmax_applies_the_log_q_correction():
    # Prepare: subtract log q. row 0 -> [2, 0, 0]: log(e^2 + 2) - 2 = log(1 + 2 e^-2) = 0.239545;
    # row 1 -> [0, 1, 0]: log(2 + e) - 0 = 1.551445.
    log_q = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    expected = torch.tensor([math.log(1 + 2 * math.exp(-2)), math.log(2 + math.e)])

    # Execute
    loss = sampled_softmax_loss(SCORES, log_q)

    # Assert
    torch.testing.assert_close(loss, expected)
    assert expected.tolist() == pytest.approx([0.239545, 1.551445], abs=1e-6)


def test_sampled_softmax_with_constant_log_q_is_unchanged():
    # Prepare: uniform sampling -> the same log q for every column cancels out.
    log_q = torch.full_like(SCORES, math.log(1 / 50))

    # Execute / Assert
    torch.testing.assert_close(sampled_softmax_loss(SCORES, log_q), sampled_softmax_loss(SCORES))


def test_bpr_hand_computed():
    # Prepare: mean over negatives of -log sigmoid(pos - neg) = softplus(neg - pos).
    # row 0: (softplus(-1) + softplus(-2)) / 2 = (0.313262 + 0.126928) / 2 = 0.220095
    # row 1: (softplus(1) + softplus(2)) / 2 = (1.313262 + 2.126928) / 2 = 1.720095
    expected = torch.tensor(
        [(softplus(-1) + softplus(-2)) / 2, (softplus(1) + softplus(2)) / 2]
    )

    # Execute
    loss = bpr_loss(SCORES)

    # Assert
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, expected)
    assert loss.tolist() == pytest.approx([0.220095, 1.720095], abs=1e-6)


def test_softmax_cross_entropy_hand_computed():
    # Prepare: log p = row - 2.407606.
    # row 0 [2,1,0], targets [1, 0, 0.5]: -(1 (2 - 2.407606) + 0.5 (0 - 2.407606)) = 1.611409
    # row 1 [0,1,2], targets [0, 1, 1]: -((1 - 2.407606) + (2 - 2.407606)) = 1.815212
    targets = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]])
    expected = torch.tensor(
        [-(2 - LOG_SUM_EXP_012) - 0.5 * (0 - LOG_SUM_EXP_012),
         -(1 - LOG_SUM_EXP_012) - (2 - LOG_SUM_EXP_012)]
    )

    # Execute
    loss = softmax_cross_entropy(SCORES, targets)

    # Assert
    torch.testing.assert_close(loss, expected)
    assert loss.tolist() == pytest.approx([1.611409, 1.815212], abs=1e-5)


def test_softmax_cross_entropy_of_zero_targets_is_zero():
    # Prepare / Execute
    loss = softmax_cross_entropy(SCORES, torch.zeros_like(SCORES))

    # Assert: a user with no targets contributes nothing.
    assert loss.tolist() == [0.0, 0.0]


def test_losses_are_shift_invariant_per_row():
    # Prepare: adding a per-row constant to every score changes no ranking loss.
    shifted = SCORES + torch.tensor([[10.0], [-3.0]])

    # Execute / Assert
    torch.testing.assert_close(sampled_softmax_loss(shifted), sampled_softmax_loss(SCORES))
    torch.testing.assert_close(bpr_loss(shifted), bpr_loss(SCORES))


def test_candidate_loss_dispatches_by_name():
    # Execute / Assert
    torch.testing.assert_close(candidate_loss("sampled-softmax", SCORES), sampled_softmax_loss(SCORES))
    torch.testing.assert_close(candidate_loss("bpr", SCORES), bpr_loss(SCORES))
    with pytest.raises(ValueError, match="Unknown candidate loss 'hinge'"):
        candidate_loss("hinge", SCORES)
    with pytest.raises(ValueError, match="Unknown candidate loss 'softmax'"):
        candidate_loss("softmax", SCORES)  # the full softmax is not a candidate loss


# ---------------------------------------------------------------- negative sampling


@settings(max_examples=200, deadline=None)
@given(
    num_items=st.integers(2, 5),
    batch=st.integers(1, 6),
    num_negatives=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_negatives_never_equal_the_rows_positive(num_items, batch, num_negatives, seed, data):
    # Prepare: tiny catalogues make clashes (and double clashes) frequent.
    positives = torch.tensor(
        data.draw(st.lists(st.integers(0, num_items - 1), min_size=batch, max_size=batch))
    )

    # Execute
    negatives = sample_negatives(
        batch, num_negatives, num_items, positives=positives,
        generator=torch.Generator().manual_seed(seed),
    )

    # Assert: shape B x M, ids in range, never the own positive.
    assert negatives.shape == (batch, num_negatives)
    assert negatives.dtype == torch.long
    assert ((negatives >= 0) & (negatives < num_items)).all()
    assert (negatives != positives.view(-1, 1)).all()


def test_two_item_catalogue_negative_is_always_the_other_item():
    # Prepare
    positives = torch.tensor([0, 1, 1, 0])

    # Execute
    negatives = sample_negatives(4, 10, 2, positives=positives,
                                 generator=torch.Generator().manual_seed(0))

    # Assert: with two items the only valid negative is 1 - positive.
    assert torch.equal(negatives, (1 - positives).view(-1, 1).expand(4, 10))


def test_negatives_without_positives_cover_the_catalogue():
    # Prepare / Execute: 5000 uniform draws from 5 items.
    negatives = sample_negatives(100, 50, 5, generator=torch.Generator().manual_seed(1))

    # Assert: every item appears, each near 1000 (binomial sd ~28; allow 6 sd).
    counts = torch.bincount(negatives.flatten(), minlength=5)
    assert negatives.shape == (100, 50)
    assert counts.numel() == 5
    assert (counts - 1000).abs().max() < 170


def test_negatives_are_deterministic_under_a_generator():
    # Prepare
    positives = torch.arange(8) % 3

    # Execute
    first = sample_negatives(8, 6, 3, positives=positives, generator=torch.Generator().manual_seed(4))
    again = sample_negatives(8, 6, 3, positives=positives, generator=torch.Generator().manual_seed(4))

    # Assert
    assert torch.equal(first, again)


@pytest.mark.parametrize("num_items", [1, 0])
def test_catalogue_too_small_for_negatives_raises(num_items):
    # Execute / Assert
    with pytest.raises(ValueError, match="at least 2 items"):
        sample_negatives(3, 4, num_items, positives=torch.zeros(3, dtype=torch.long))
