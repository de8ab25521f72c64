"""Central training and evaluation: it learns, it is reproducible, evaluation chunks merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtower.central import build_model, run_central
from fedtower.data.prepared import UserHistories, prepare_split
from fedtower.data.synthetic import SyntheticConfig, generate
from fedtower.models.training import (
    TrainConfig,
    batch_targets,
    evaluate,
    make_optimizer,
    train,
)
from fedtower.models.two_tower import TwoTower, TwoTowerConfig

MODEL = {"dim": 32, "content_hidden": 32}
SMALL = {"epochs": 8, "history_len": 50, "num_negatives": 32}


@pytest.fixture(scope="module")
def dataset():
    return generate(SyntheticConfig(num_users=300, num_items=400, seed=0))


@pytest.fixture(scope="module")
def softmax_run(dataset):
    return run_central(dataset, model_settings=MODEL, train_config=TrainConfig(**SMALL))


def histories_of(lists: list[list[int]], weights: list[list[float]] | None = None) -> UserHistories:
    """UserHistories from plain lists (user u owns lists[u], oldest first)."""
    weights = weights or [[1.0] * len(items) for items in lists]
    indptr = np.concatenate([[0], np.cumsum([len(items) for items in lists])]).astype(np.int64)
    return UserHistories(
        users=[f"u{i}" for i in range(len(lists))],
        indptr=indptr,
        items=np.array([i for items in lists for i in items], dtype=np.int64),
        weights=np.array([w for ws in weights for w in ws], dtype=np.float32),
    )


# ---------------------------------------------------------------- it learns


def test_softmax_training_beats_popularity(softmax_run):
    # Prepare / Execute: 8 epochs on 300 users x 400 items (fixture).
    metrics, popularity = softmax_run["metrics"], softmax_run["popularity"]

    # Assert: clearly above the popularity floor on both ranking metrics (seen ~1.5x).
    assert metrics["ndcg@20"] > 1.2 * popularity["ndcg@20"]
    assert metrics["recall@20"] > 1.2 * popularity["recall@20"]
    assert metrics["users"] == popularity["users"] > 0


def test_softmax_training_loss_decreases(softmax_run):
    # Prepare
    losses = [epoch["loss"] for epoch in softmax_run["epochs"]]

    # Assert: one log per epoch; the last epoch is well below the first.
    assert len(losses) == SMALL["epochs"]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.95 * losses[0]


@pytest.fixture
def deterministic_torch():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def test_same_seed_gives_identical_results(dataset, deterministic_torch):
    # Prepare: deterministic kernels.
    config = TrainConfig(**SMALL)

    # Execute: the same run twice, and once with another seed.
    first = run_central(dataset, model_settings=MODEL, train_config=config)
    again = run_central(dataset, model_settings=MODEL, train_config=config)
    other = run_central(dataset, model_settings=MODEL, train_config=TrainConfig(**SMALL, seed=1))

    # Assert: bit-identical metrics and epoch losses; the seed does matter.
    assert again["metrics"] == first["metrics"]
    assert [e["loss"] for e in again["epochs"]] == [e["loss"] for e in first["epochs"]]
    assert [e["loss"] for e in other["epochs"]] != [e["loss"] for e in first["epochs"]]


def test_same_seed_in_default_mode_agrees_to_rounding(dataset, softmax_run):
    # Execute: the fixture's run again, default (multi-threaded, non-deterministic) kernels.
    again = run_central(dataset, model_settings=MODEL, train_config=TrainConfig(**SMALL))

    # Assert: equal up to float32 accumulation-order noise.
    assert again["metrics"] == pytest.approx(softmax_run["metrics"], rel=1e-5)
    assert [e["loss"] for e in again["epochs"]] == pytest.approx(
        [e["loss"] for e in softmax_run["epochs"]], rel=1e-5
    )


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs a multi-threaded CPU backward")
def test_user_vectors_gradient_is_bitwise_reproducible():
    # Prepare: many repeated rows, so the accumulation order matters.
    torch.manual_seed(0)
    model = TwoTower(TwoTowerConfig(num_items=50, num_users=0, dim=32))
    history = torch.randint(0, 50, (256, 200), generator=torch.Generator().manual_seed(1))

    # Execute: the same backward three times.
    grads = []
    for _ in range(3):
        model.zero_grad()
        vectors, _ = model.item_table()
        model.user_vectors(None, history, vectors).pow(2).sum().backward()
        grads.append(model.item_tower.id_embedding.weight.grad.clone())

    # Assert
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("loss", ["sampled-softmax", "bpr"])
def test_sampled_losses_train(dataset, loss):
    # Execute
    result = run_central(dataset, model_settings=MODEL, train_config=TrainConfig(loss=loss, **SMALL))
    losses = [epoch["loss"] for epoch in result["epochs"]]

    # Assert: the loss falls by at least 10% (seen ~20-35%) and ranking beats popularity.
    # Chance level of sampled softmax with 32 negatives is log 33 = 3.50; of BPR log 2 = 0.69.
    assert losses[-1] < 0.9 * losses[0]
    assert losses[0] < {"sampled-softmax": 3.6, "bpr": 0.75}[loss]
    assert result["metrics"]["ndcg@20"] > result["popularity"]["ndcg@20"]


@pytest.mark.parametrize("loss", ["softmax", "sampled-softmax"])
def test_history_only_model_without_user_table_trains(loss):
    # Prepare: num_users = 0 (pure history pooling) on a tiny dataset.
    data = generate(SyntheticConfig(num_users=60, num_items=80, num_categories=5, seed=2))
    split = prepare_split(data)
    model = TwoTower(TwoTowerConfig(num_items=split.num_items, num_users=0, dim=16))
    before = model.item_tower.id_embedding.weight.detach().clone()

    # Execute
    logs = train(model, split.train, TrainConfig(epochs=6, loss=loss, num_negatives=16, history_len=30))

    # Assert: the item tower moved and the loss fell.
    assert not torch.equal(model.item_tower.id_embedding.weight, before)
    assert logs[-1]["loss"] < logs[0]["loss"]


# ---------------------------------------------------------------- evaluation


def test_evaluate_in_chunks_merges_to_the_same_result(dataset):
    # Prepare: a model with a random (non-zero) user table, so chunking must keep user ids right.
    split = prepare_split(dataset)
    model = build_model(dataset, split, **MODEL)
    with torch.no_grad():
        model.user_tower.embedding.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    popularity = split.popularity()

    # Execute: 300 users in 43 chunks of 7 (last one 6) vs one chunk.
    chunked = evaluate(model, split.train, split.test, popularity=popularity, chunk=7)
    whole = evaluate(model, split.train, split.test, popularity=popularity, chunk=1000)

    # Assert: same counts and recommendation tallies exactly, same means up to float order.
    assert chunked.users == whole.users > 0
    assert chunked.hit_users == whole.hit_users
    assert np.array_equal(chunked.item_counts, whole.item_counts)
    assert chunked.finalize() == pytest.approx(whole.finalize(), rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------- pieces


def test_batch_targets_are_the_users_own_weights():
    # Prepare: user 0 has items 2 (w 1.0) and 0 (w 0.3); user 1 has item 3 (w 0.6).
    histories = histories_of([[2, 0], [3]], [[1.0, 0.3], [0.6]])

    # Execute
    targets = batch_targets(histories, np.array([1, 0]), num_items=4)

    # Assert: rows follow the requested user order.
    torch.testing.assert_close(
        targets, torch.tensor([[0.0, 0.0, 0.0, 0.6], [0.3, 0.0, 1.0, 0.0]])
    )


def test_optimizer_puts_user_l2_only_on_the_user_table():
    # Prepare
    model = TwoTower(TwoTowerConfig(num_items=5, num_users=3, dim=4, content_dim=2))

    # Execute
    optimizer = make_optimizer(model, TrainConfig(user_l2=0.7, weight_decay=0.01))
    groups = optimizer.param_groups

    # Assert: item-tower params decay 0.01, the user table 0.7; every parameter once.
    assert [g["weight_decay"] for g in groups] == [0.01, 0.7]
    assert groups[1]["params"] == [model.user_tower.embedding.weight]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_train_without_any_interaction_raises():
    # Prepare
    model = TwoTower(TwoTowerConfig(num_items=4, num_users=2, dim=4))

    # Execute / Assert
    with pytest.raises(ValueError, match="No user has any training interaction"):
        train(model, histories_of([[], []]), TrainConfig(epochs=1))


def test_train_skips_users_without_history_and_logs_each_epoch():
    # Prepare: 3 users, one empty; batch 2 -> 1 step per epoch.
    model = TwoTower(TwoTowerConfig(num_items=6, num_users=3, dim=4))
    seen: list[dict] = []

    # Execute
    logs = train(model, histories_of([[1, 2, 3], [], [4, 5]]), TrainConfig(epochs=3, batch_size=2),
                 progress=seen.append)

    # Assert: progress gets the same per-epoch logs; the empty user's row never moved
    # (zero-initialised and only decayed), the others did.
    assert [log["epoch"] for log in logs] == [1, 2, 3]
    assert seen == logs
    table = model.user_tower.embedding.weight
    assert torch.equal(table[1], torch.zeros(4))
    assert table[0].abs().sum() > 0 and table[2].abs().sum() > 0


def test_onecycle_schedule_with_ten_total_steps_trains():
    # Prepare: 10 users, batch 5 -> 2 steps per epoch, 5 epochs -> 10 scheduler steps.
    model = TwoTower(TwoTowerConfig(num_items=12, num_users=10, dim=4))
    histories = histories_of([[i, i + 1] for i in range(10)])

    # Execute
    logs = train(model, histories, TrainConfig(epochs=5, batch_size=5, schedule="onecycle"))

    # Assert
    assert len(logs) == 5


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"lr": float("nan")}, "lr must be positive"),
        ({"schedule": "cosine"}, "schedule must be 'onecycle' or 'constant'"),
        ({"history_dropout": 1.0}, r"history_dropout must be in \[0, 1\)"),
        ({"history_dropout": -0.1}, r"history_dropout must be in \[0, 1\)"),
        ({"loss": "hinge"}, "loss must be one of"),
    ],
)
def test_train_config_validation_errors(settings, message):
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


@pytest.mark.parametrize("num_negatives", [0, -1])
def test_train_config_rejects_fewer_than_one_negative(num_negatives):
    # Execute / Assert
    with pytest.raises(ValueError, match="num_negatives"):
        TrainConfig(loss="bpr", num_negatives=num_negatives)


def test_train_config_round_trips_through_to_dict():
    # Prepare
    config = TrainConfig(epochs=3, loss="bpr", schedule="constant")

    # Execute / Assert
    assert TrainConfig(**config.to_dict()) == config


# ---------------------------------------------------------------- cross-device options


def test_reconstruction_fits_the_users_vectors_and_leaves_the_item_tower_as_received():
    # Prepare: a received item tower, and two users whose free vectors start at zero.
    from fedtower.client.handlers import reconstruct_users

    torch.manual_seed(0)
    model = TwoTower(TwoTowerConfig(num_items=30, num_users=2, dim=8))
    histories = histories_of([[1, 2, 3, 4], [5, 6, 7]])
    config = TrainConfig(epochs=1, history_len=10, history_dropout=0.0, schedule="constant", lr=0.05)
    received = {k: v.clone() for k, v in model.item_tower_state().items()}
    before = model.user_tower.embedding.weight.detach().clone()

    # Execute
    reconstruct_users(model, histories, config, epochs=5)

    # Assert: every item-tower tensor is bit-for-bit the one received, no gradient is left on it, and the
    # free vectors moved.
    for key, value in model.item_tower_state().items():
        assert torch.equal(value, received[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(model.user_tower.embedding.weight, before)
    # The item tower was only held still for the refit: it trains again afterwards.
    assert all(p.requires_grad for p in model.item_tower.parameters())


def test_reconstruction_uses_its_own_learning_rate():
    # Prepare: the same model and data twice; a learning rate far from the round's.
    from fedtower.client.handlers import reconstruct_users

    def fitted(lr):
        torch.manual_seed(0)
        model = TwoTower(TwoTowerConfig(num_items=30, num_users=1, dim=8))
        config = TrainConfig(epochs=1, history_len=10, history_dropout=0.0, schedule="constant", lr=0.5)
        reconstruct_users(model, histories_of([[1, 2, 3]]), config, epochs=1, lr=lr)
        return model.user_tower.embedding.weight.detach().clone()

    # Execute
    small, default = fitted(1e-3), fitted(0.0)

    # Assert: one Adam step from zero moves every coordinate by about its learning rate (1e-3 or, with
    # 0, the round's 0.5).
    assert small.abs().max().item() == pytest.approx(1e-3, rel=0.05)
    assert default.abs().max().item() == pytest.approx(0.5, rel=0.05)


def test_after_reconstruction_the_round_trains_the_item_tower_only():
    # Prepare: a one-user client with reconstruction on, and local SGD at a large learning rate.
    from fedtower.client.handlers import local_optimizer, reconstruct_users
    from fedtower.config import RunSettings

    settings = RunSettings(reconstruction_epochs=2, local_optimizer="sgd", lr=0.5)
    torch.manual_seed(0)
    model = TwoTower(TwoTowerConfig(num_items=30, num_users=1, dim=8))
    histories = histories_of([[1, 2, 3, 4]])
    config = TrainConfig(epochs=2, history_len=10, history_dropout=0.0, schedule="constant", lr=0.5,
                         optimizer="sgd")
    reconstruct_users(model, histories, config, epochs=2, lr=0.01)
    fitted = model.user_tower.embedding.weight.detach().clone()
    received = {k: v.clone() for k, v in model.item_tower_state().items()}

    # Execute
    train(model, histories, config, optimizer=local_optimizer(model, config, settings))

    # Assert: the reconstructed user vector is untouched (not even decayed), the item tower moved.
    assert torch.equal(model.user_tower.embedding.weight, fitted)
    assert not torch.equal(model.item_tower_state()["item_tower.id_embedding.weight"],
                           received["item_tower.id_embedding.weight"])
    # Without reconstruction the same optimizer holds the user tower too.
    plain = local_optimizer(model, config, RunSettings(local_optimizer="sgd", lr=0.5))
    assert len(plain.param_groups) == 2


def test_local_sgd_takes_plain_gradient_steps():
    # Prepare
    model = TwoTower(TwoTowerConfig(num_items=10, num_users=1, dim=4))
    # Execute
    optimizer = make_optimizer(model, TrainConfig(optimizer="sgd", lr=0.5))
    # Assert: SGD without momentum, the user tower with its own L2.
    assert type(optimizer) is torch.optim.SGD
    assert all(group["lr"] == 0.5 and group.get("momentum", 0) == 0 for group in optimizer.param_groups)
    with pytest.raises(ValueError, match="optimizer must be 'adam' or 'sgd'"):
        TrainConfig(optimizer="lion")
