"""Two-tower model: Opacus compatibility, per-sample gradients, state split, pooling, helpers."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from opacus import GradSampleModule
from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct
from opacus.validators import ModuleValidator

from fedtower.models.losses import sampled_softmax_loss
from fedtower.models.two_tower import (
    PAD,
    ItemTower,
    TwoTower,
    TwoTowerConfig,
    drop_history,
    pad_histories,
    recency_weights,
)

# Opacus warns that its full backward hooks fire although no *input* needs a gradient
# (inputs are integer ids); that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

NUM_ITEMS, NUM_USERS, DIM, CONTENT_DIM, HIDDEN = 7, 4, 4, 3, 5

# A batch of 4 users: history length 3 (PAD = -1), 3 candidates each (positive in column 0).
# Row 1 has pads and never touches item 0; row 3 has an empty history.
USER_IDS = torch.tensor([0, 1, 2, 3])
HISTORY = torch.tensor([[1, 2, 3], [4, PAD, PAD], [5, 6, 1], [PAD, PAD, PAD]])
CANDIDATES = torch.tensor([[2, 5, 0], [1, 3, 6], [0, 4, 2], [6, 1, 3]])


def tiny_model(
    pooling: str = "mean", *, content: bool = True, users: bool = True, seed: int = 0
) -> TwoTower:
    """A tiny model with every parameter random (the user table and bias start at zero
    otherwise, which would hide their gradient paths)."""
    generator = torch.Generator().manual_seed(seed)
    config = TwoTowerConfig(
        num_items=NUM_ITEMS,
        num_users=NUM_USERS if users else 0,
        dim=DIM,
        content_dim=CONTENT_DIM if content else 0,
        content_hidden=HIDDEN,
        pooling=pooling,
        recency=1.5,
    )
    features = torch.randn(NUM_ITEMS, CONTENT_DIM, generator=generator) if content else None
    model = TwoTower(config, features)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


class PackedTwoTower(nn.Module):
    """One-tensor forward for Opacus' checker: x = [user | history (L) | candidates (C)].

    Returns the per-sample sampled-softmax loss as B x 1 (always positive, so the
    checker's L1-to-zero criterion is the loss itself and its reductions match Opacus').
    """

    def __init__(self, model: TwoTower, history_len: int):
        super().__init__()
        self.model = model
        self.history_len = history_len

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = self.history_len
        scores = self.model(x[:, 0], x[:, 1 : 1 + length], x[:, 1 + length :])
        return sampled_softmax_loss(scores).unsqueeze(-1)


def microbatch_grads(model: TwoTower) -> dict[str, torch.Tensor]:
    """Slow reference: per-example gradients by running each example alone (batch size 1)."""
    per_example: dict[str, list[torch.Tensor]] = {n: [] for n, _ in model.named_parameters()}
    for i in range(len(USER_IDS)):
        model.zero_grad(set_to_none=True)
        scores = model(USER_IDS[i : i + 1], HISTORY[i : i + 1], CANDIDATES[i : i + 1])
        sampled_softmax_loss(scores).sum().backward()
        for name, parameter in model.named_parameters():
            grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
            per_example[name].append(grad.detach().clone())
    return {name: torch.stack(grads) for name, grads in per_example.items()}


# ---------------------------------------------------------------- Opacus compatibility


@pytest.mark.parametrize("pooling", ["mean", "attention"])
@pytest.mark.parametrize("with_content_and_users", [True, False])
def test_module_validator_accepts_the_model(pooling, with_content_and_users):
    # Prepare
    model = tiny_model(pooling, content=with_content_and_users, users=with_content_and_users)

    # Execute: strict=True raises UnsupportedModuleError on any incompatible layer.
    errors = ModuleValidator.validate(model, strict=False)
    ModuleValidator.validate(model, strict=True)

    # Assert: no BatchNorm or other unsupported module; the optional parts really exist or not.
    assert errors == []
    assert (model.item_tower.content_mlp is not None) is with_content_and_users
    assert (model.user_tower.embedding is not None) is with_content_and_users


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_opacus_checker_confirms_per_sample_gradients_in_hooks_mode(pooling):
    # Prepare: packed input B x (1 + L + C) = 4 x 7.
    packed = torch.cat([USER_IDS.view(-1, 1), HISTORY, CANDIDATES], dim=1)
    module = PackedTwoTower(tiny_model(pooling), history_len=HISTORY.shape[1])

    # Execute: compares Opacus hooks grad samples with microbatch gradients, sum and mean.
    correct = check_per_sample_gradients_are_correct(
        packed, module, grad_sample_mode="hooks", atol=1e-6, rtol=1e-5
    )

    # Assert
    assert correct


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_grad_sample_module_matches_batch_size_one_loop_for_every_parameter(pooling, reduction):
    # Prepare: reference from batch-size-1 loops; Opacus on a copy of the same weights.
    model = tiny_model(pooling)
    expected = microbatch_grads(copy.deepcopy(model))
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction=reduction)

    # Execute: one batched backward with the reduction Opacus was told about.
    losses = sampled_softmax_loss(wrapped(USER_IDS, HISTORY, CANDIDATES))
    (losses.sum() if reduction == "sum" else losses.mean()).backward()
    actual = {name: p.grad_sample for name, p in model.named_parameters()}

    # Assert: every trainable tensor, id/bias embeddings, content MLP and user table included.
    assert set(actual) == {
        "item_tower.id_embedding.weight",
        "item_tower.bias.weight",
        "item_tower.content_mlp.0.weight",
        "item_tower.content_mlp.0.bias",
        "item_tower.content_mlp.2.weight",
        "item_tower.content_mlp.2.bias",
        "user_tower.embedding.weight",
    }
    for name, grad_sample in actual.items():
        assert grad_sample.shape == expected[name].shape, name
        torch.testing.assert_close(grad_sample, expected[name], atol=1e-6, rtol=1e-5, msg=name)
        # Non-vacuous: every parameter gets a non-zero gradient from some example.
        assert expected[name].abs().sum() > 0, name


def test_per_sample_gradients_touch_only_the_examples_own_rows():
    # Prepare
    model = tiny_model("attention")
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")

    # Execute
    sampled_softmax_loss(wrapped(USER_IDS, HISTORY, CANDIDATES)).sum().backward()
    user_grads = model.user_tower.embedding.weight.grad_sample  # 4 x 4 users x dim
    item_grads = model.item_tower.id_embedding.weight.grad_sample  # 4 x 7 items x dim
    bias_grads = model.item_tower.bias.weight.grad_sample  # 4 x 7 x 1

    # Assert: example i moves only user row i; items only in its real history or candidates.
    # Row 1 (history [4, pad, pad], candidates [1, 3, 6]) must leave item 0 (the id pads are
    # clamped to) exactly untouched; bias only ever moves for candidates.
    for i in range(len(USER_IDS)):
        touched_users = user_grads[i].abs().sum(-1) != 0
        assert touched_users.tolist() == [u == i for u in range(NUM_USERS)]
        real = set(HISTORY[i][HISTORY[i] != PAD].tolist()) | set(CANDIDATES[i].tolist())
        touched_items = set(torch.nonzero(item_grads[i].abs().sum(-1)).flatten().tolist())
        assert touched_items <= real, i
        touched_bias = set(torch.nonzero(bias_grads[i].abs().sum(-1)).flatten().tolist())
        assert touched_bias == set(CANDIDATES[i].tolist()), i
    assert item_grads[1, 0].abs().sum() == 0


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_each_layer_is_called_exactly_once_per_forward(pooling):
    # Prepare: count forward calls of every embedding and linear layer.
    model = tiny_model(pooling)
    calls: dict[str, int] = {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.Linear))}
    for name, layer in layers.items():
        layer.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))

    # Execute
    model(USER_IDS, HISTORY, CANDIDATES)

    # Assert: id, bias and user embeddings plus the two MLP layers, once each.
    assert set(layers) == {
        "item_tower.id_embedding",
        "item_tower.bias",
        "item_tower.content_mlp.0",
        "item_tower.content_mlp.2",
        "user_tower.embedding",
    }
    assert calls == {name: 1 for name in layers}


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_per_sample_forward_agrees_with_whole_catalogue_scores(pooling):
    # Prepare
    model = tiny_model(pooling)

    # Execute: the Opacus-facing form and the serving form.
    per_sample = model(USER_IDS, HISTORY, CANDIDATES)
    catalogue = model.score_all(USER_IDS, HISTORY)

    # Assert: same scores for the same (user, item) pairs; all finite (empty history included).
    torch.testing.assert_close(per_sample, catalogue.gather(1, CANDIDATES))
    assert torch.isfinite(catalogue).all()


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_padding_anywhere_does_not_change_scores(pooling):
    # Prepare: the same history [3, 5] unpadded, right-padded and left-padded.
    model = tiny_model(pooling)
    users, candidates = torch.tensor([2]), torch.tensor([[0, 1, 6]])

    # Execute
    plain = model(users, torch.tensor([[3, 5]]), candidates)
    right = model(users, torch.tensor([[3, 5, PAD, PAD]]), candidates)
    left = model(users, torch.tensor([[PAD, PAD, 3, 5]]), candidates)

    # Assert
    torch.testing.assert_close(right, plain)
    torch.testing.assert_close(left, plain)


def test_empty_history_without_user_table_scores_by_bias_alone():
    # Prepare: no free user embedding, so an all-pad history gives the zero user vector.
    model = tiny_model("attention", users=False)

    # Execute
    scores = model(torch.tensor([0]), torch.tensor([[PAD, PAD]]), torch.tensor([[4, 2]]))

    # Assert: score = <0, item> + bias(item).
    expected = model.item_tower.bias.weight[[4, 2], 0].view(1, 2)
    torch.testing.assert_close(scores, expected)


# ---------------------------------------------------------------- state split


def test_item_and_user_state_split_the_state_dict_by_prefix():
    # Prepare
    model = tiny_model()

    # Execute
    item_state, user_state, full = model.item_tower_state(), model.user_state(), model.state_dict()

    # Assert: disjoint, union is everything, no user tensor in the shareable part.
    assert all(key.startswith("item_tower.") for key in item_state)
    assert not any("user" in key for key in item_state)
    assert list(user_state) == ["user_tower.embedding.weight"]
    assert set(item_state).isdisjoint(user_state)
    assert set(item_state) | set(user_state) == set(full)
    user_table = model.user_tower.embedding.weight
    assert all(tensor.shape != user_table.shape for tensor in item_state.values())


def test_content_features_are_not_in_the_state_dict_and_survive_loading():
    # Prepare: two models of the same config with different content features.
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    target_content = target.item_tower.content.clone()
    assert not torch.equal(source.item_tower.content, target_content)

    # Execute: ship only the item tower from source to target.
    result = target.load_state_dict(source.item_tower_state(), strict=False)

    # Assert: only the private user table is missing; content is not a key anywhere and
    # the target keeps its own features while taking the source's weights.
    assert not any("content" in key and "mlp" not in key for key in source.state_dict())
    assert result.missing_keys == ["user_tower.embedding.weight"]
    assert result.unexpected_keys == []
    assert torch.equal(target.item_tower.content, target_content)
    for key, tensor in source.item_tower_state().items():
        assert torch.equal(target.state_dict()[key], tensor), key


def test_model_without_user_table_has_empty_user_state():
    # Prepare
    model = tiny_model(users=False, content=False)

    # Execute
    item_state, user_state = model.item_tower_state(), model.user_state()

    # Assert
    assert user_state == {}
    assert set(item_state) == {"item_tower.id_embedding.weight", "item_tower.bias.weight"}


# ---------------------------------------------------------------- recency weights


def test_recency_zero_gives_uniform_weights_over_real_items():
    # Prepare: three real items, one pad.
    mask = torch.tensor([[1, 1, 1, 0]])

    # Execute
    weights = recency_weights(mask, 0.0)

    # Assert: 1/3 each, pad 0.
    torch.testing.assert_close(weights, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]]))


def test_recency_weights_hand_computed():
    # Prepare: recency r = 3, length 3 -> raw exp(3 (p - 2) / 3) = e^-2, e^-1, e^0.
    mask = torch.tensor([[1, 1, 1, 0]])
    total = math.exp(-2) + math.exp(-1) + 1.0  # 1.503214
    expected = [math.exp(-2) / total, math.exp(-1) / total, 1.0 / total, 0.0]
    # = [0.090031, 0.244728, 0.665241, 0]

    # Execute
    weights = recency_weights(mask, 3.0)

    # Assert: newest weighs most and the weights sum to 1.
    torch.testing.assert_close(weights, torch.tensor([expected]))
    assert weights.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "mask",
    [[[0, 1, 1, 1]], [[1, 0, 1, 1]], [[0, 0, 1, 1, 1]]],
    ids=["left-padded", "pad-in-middle", "two-left-pads"],
)
def test_padding_position_does_not_change_weights_of_real_items(mask):
    # Prepare: the right-padded reference with the same three real items.
    reference = recency_weights(torch.tensor([[1, 1, 1, 0]]), 2.0)[0, :3]
    mask = torch.tensor(mask)

    # Execute
    weights = recency_weights(mask, 2.0)

    # Assert: real items get the reference weights in order, pads get zero.
    torch.testing.assert_close(weights[mask.bool()], reference)
    assert (weights[~mask.bool()] == 0).all()


def test_recency_weights_of_empty_and_single_histories():
    # Prepare
    mask = torch.tensor([[0, 0, 0], [0, 1, 0]])

    # Execute
    weights = recency_weights(mask, 5.0)

    # Assert: an empty history has all-zero weights (no NaN); one item takes weight 1.
    torch.testing.assert_close(weights, torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))


# ---------------------------------------------------------------- pad / drop history


def test_pad_histories_keeps_the_most_recent_items_and_pads_right():
    # Prepare: oldest first; numpy arrays and lists both accepted.
    histories = [np.array([1, 2, 3, 4, 5]), [7], []]

    # Execute
    padded = pad_histories(histories, max_len=3)

    # Assert: last three of the first user, pads -1.
    assert padded.dtype == torch.long
    assert padded.tolist() == [[3, 4, 5], [7, PAD, PAD], [PAD, PAD, PAD]]


def test_pad_histories_width_is_the_longest_history_up_to_max_len():
    # Prepare / Execute
    short = pad_histories([[1, 2], [3]], max_len=10)
    empty = pad_histories([[], []], max_len=10)

    # Assert: width 2 (not 10); all-empty still has one (pad) column.
    assert short.tolist() == [[1, 2], [3, PAD]]
    assert empty.tolist() == [[PAD], [PAD]]


def test_drop_history_with_rate_zero_is_identity():
    # Prepare
    history = torch.tensor([[1, 2, PAD]])

    # Execute
    out = drop_history(history, 0.0)

    # Assert
    assert torch.equal(out, history)


def test_drop_everything_keeps_each_users_newest_item():
    # Prepare: rate 1 drops every item (rand >= 1 never holds); left- and right-padded rows.
    history = torch.tensor([[1, 2, 3, PAD], [4, PAD, PAD, PAD], [PAD, PAD, 5, 6], [PAD] * 4])

    # Execute
    out = drop_history(history, 1.0, torch.Generator().manual_seed(0))

    # Assert: newest (rightmost real) kept; an empty user stays empty.
    assert out.tolist() == [
        [PAD, PAD, 3, PAD],
        [4, PAD, PAD, PAD],
        [PAD, PAD, PAD, 6],
        [PAD] * 4,
    ]


@pytest.mark.parametrize("rate", [0.3, 0.7, 0.95])
def test_drop_history_never_empties_a_user_and_only_removes(rate):
    # Prepare: 200 users with 0-6 items each, right-padded.
    generator = torch.Generator().manual_seed(11)
    lengths = torch.randint(0, 7, (200,), generator=generator)
    items = torch.randint(0, 50, (200, 6), generator=generator)
    history = torch.where(torch.arange(6) < lengths.view(-1, 1), items, torch.full_like(items, PAD))

    # Execute
    out = drop_history(history, rate, torch.Generator().manual_seed(3))

    # Assert: each entry is kept or turned to PAD; users with items keep at least one;
    # the share dropped is near the rate (binomial over ~600 items, 6-sigma band).
    assert ((out == history) | (out == PAD)).all()
    has_items = (history != PAD).any(1)
    assert ((out != PAD).any(1) == has_items).all()
    real = int((history != PAD).sum())
    dropped = int(((history != PAD) & (out == PAD)).sum()) / real
    assert abs(dropped - rate) < 0.2 + 6 * math.sqrt(rate * (1 - rate) / real)
    assert dropped > 0


def test_drop_history_is_deterministic_under_a_generator():
    # Prepare
    history = torch.arange(400).view(20, 20)

    # Execute
    first = drop_history(history, 0.5, torch.Generator().manual_seed(5))
    again = drop_history(history, 0.5, torch.Generator().manual_seed(5))
    other = drop_history(history, 0.5, torch.Generator().manual_seed(6))

    # Assert: same seed, same mask; another seed differs (400 coin flips).
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


# ---------------------------------------------------------------- item cold start


def test_content_vectors_equal_forward_when_id_embedding_is_zero():
    # Prepare: zero the id table, so an item's vector is its content part alone.
    model = tiny_model()
    tower = model.item_tower
    with torch.no_grad():
        tower.id_embedding.weight.zero_()
    ids = torch.tensor([0, 3, 6])

    # Execute
    vectors, bias = tower(ids)
    cold = tower.content_vectors(tower.content[ids])

    # Assert: same vectors; content_vectors also embeds a brand-new (unlisted) item.
    torch.testing.assert_close(cold, vectors)
    assert cold.abs().sum() > 0
    assert tower.content_vectors(torch.randn(2, CONTENT_DIM)).shape == (2, DIM)
    torch.testing.assert_close(bias, tower.bias.weight[ids, 0])


def test_content_vectors_without_content_mlp_raises():
    # Prepare
    tower = ItemTower(TwoTowerConfig(num_items=3, dim=2))

    # Execute / Assert
    with pytest.raises(ValueError, match="no content MLP"):
        tower.content_vectors(torch.zeros(1, 2))


def test_content_of_the_wrong_shape_is_rejected():
    # Prepare
    config = TwoTowerConfig(num_items=3, dim=2, content_dim=4)

    # Execute / Assert
    with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
        TwoTower(config, torch.zeros(3, 5))


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_items": 0}, "num_items must be at least 1"),
        ({"num_items": 5, "num_users": -1}, "num_users must be 0 or more"),
        ({"num_items": 5, "dim": 0}, "dim must be at least 1"),
        ({"num_items": 5, "pooling": "max"}, "pooling must be one of"),
        ({"num_items": 5, "recency": -0.5}, "recency must be non-negative"),
        ({"num_items": 5, "recency": float("nan")}, "recency must be non-negative"),
    ],
)
def test_config_validation_errors(settings, message):
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        TwoTowerConfig(**settings)


def test_config_round_trips_through_to_dict():
    # Prepare
    config = TwoTowerConfig(num_items=9, num_users=2, dim=8, pooling="attention", recency=1.0)

    # Execute
    again = TwoTowerConfig(**config.to_dict())

    # Assert
    assert again == config
    assert config.to_dict()["pooling"] == "attention"
