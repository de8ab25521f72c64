"""The item-tower strategy wrapper: reply validation, exact evaluation merge, state round trip."""

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg

from fedtower.metrics import evaluate_scores
from fedtower.strategies.item_tower import (
    ItemTowerStrategy,
    array_spec,
    build_inner_strategy,
    reply_problem,
    restore_strategy_state,
    strategy_state,
)
from tests.flower_utils import server_message, task_identity

KEYS = ("item_tower.id_embedding.weight", "item_tower.bias.weight")


def tower(value: float) -> ArrayRecord:
    return ArrayRecord({
        KEYS[0]: Array(np.full((4, 2), value, dtype=np.float32)),
        KEYS[1]: Array(np.full((4, 1), value, dtype=np.float32)),
    })  # fmt: skip


def reply(node_id: int, arrays: ArrayRecord, examples: float = 1.0, **extra) -> Message:
    original = server_message(tower(0.0), node_id=node_id)
    metrics = MetricRecord({"num-examples": examples, "train-loss": 1.0})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics, **extra}), reply_to=original)


@pytest.fixture(autouse=True)
def identity():
    with task_identity():
        yield


def test_wellformed_reply_passes():
    assert reply_problem(reply(1, tower(1.0)), array_spec(tower(0.0))) is None


@pytest.mark.parametrize(
    ("arrays", "examples", "expected"),
    [
        (ArrayRecord({KEYS[0]: Array(np.zeros((4, 2), np.float32))}), 1.0, "missing"),
        (ArrayRecord({**{k: Array(np.zeros((4, 2 if i == 0 else 1), np.float32)) for i, k in enumerate(KEYS)},
                      "user_tower.embedding.weight": Array(np.zeros((3, 2), np.float32))}), 1.0, "unexpected"),
        (ArrayRecord({KEYS[0]: Array(np.zeros((5, 2), np.float32)), KEYS[1]: Array(np.zeros((4, 1), np.float32))}),
         1.0, "shape"),
        (tower(float("nan")), 1.0, "NaN or Inf"),
        (tower(float("inf")), 1.0, "NaN or Inf"),
        (tower(1.0), 0.0, "num-examples"),
    ],
)  # fmt: skip
def test_malformed_replies_are_named(arrays, examples, expected):
    problem = reply_problem(reply(1, arrays, examples), array_spec(tower(0.0)))
    assert problem is not None and expected in problem


def test_round_goes_on_without_bad_and_failed_replies(caplog):
    # Prepare: two good replies (1.0 with weight 1, 4.0 with weight 3), one NaN, one failure.
    seen = []
    strategy = ItemTowerStrategy(FedAvg(), expected_arrays=array_spec(tower(0.0)), num_rounds=5,
                                 round_offset=2, on_round_end=lambda r, a, m: seen.append((r, a, m)))  # fmt: skip
    strategy.current_arrays = tower(0.0)
    failed = Message(Error(code=0, reason="boom"), reply_to=server_message(tower(0.0), node_id=44))
    replies = [reply(11, tower(1.0), 1.0), reply(22, tower(4.0), 3.0), reply(33, tower(float("nan"))), failed]
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedtower.server"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert: weighted mean (1*1 + 4*3) / 4 = 3.25 over the good replies only.
    np.testing.assert_allclose(arrays[KEYS[0]].numpy(), 3.25)
    assert strategy.rejected == [(3, 33, "'item_tower.id_embedding.weight' holds NaN or Inf")]
    assert "node 33" in caplog.text and "node 44 failed: boom" in caplog.text
    # The callback saw the global round number (offset 2 + round 1) and the new arrays.
    assert seen[0][0] == 3 and seen[0][1] is arrays and seen[0][2]["train-loss"] == 1.0


def test_no_usable_reply_keeps_the_tower():
    seen = []
    strategy = ItemTowerStrategy(FedAvg(), expected_arrays=array_spec(tower(0.0)), num_rounds=3,
                                 on_round_end=lambda r, a, m: seen.append(a))  # fmt: skip
    strategy.current_arrays = tower(7.0)
    arrays, _ = strategy.aggregate_train(1, [reply(1, tower(float("nan")))])
    assert arrays is None
    np.testing.assert_allclose(seen[0][KEYS[0]].numpy(), 7.0)


def test_evaluation_merges_sums_exactly_not_client_means():
    # Prepare: client A has 1 user, client B has 3; a mean of client means would weigh A 50%.
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 30))
    relevant = [rng.choice(30, 3, replace=False) for _ in range(4)]
    part_a = evaluate_scores(scores[:1], exclude=None, relevant=relevant[:1], k=5)
    part_b = evaluate_scores(scores[1:], exclude=None, relevant=relevant[1:], k=5)
    whole = evaluate_scores(scores, exclude=None, relevant=relevant, k=5).finalize()
    evaluations = []
    strategy = ItemTowerStrategy(FedAvg(), expected_arrays=array_spec(tower(0.0)), num_rounds=3,
                                 on_evaluate=lambda r, m: evaluations.append(m))  # fmt: skip
    replies = [
        Message(content=RecordDict({"metrics": MetricRecord({**p.to_dict(), "num-examples": p.users})}),
                reply_to=server_message(tower(0.0), node_id=n, message_type="evaluate"))
        for n, p in ((1, part_a), (2, part_b))
    ]  # fmt: skip
    # Execute
    merged = strategy.aggregate_evaluate(1, replies)
    # Assert
    for key in ("ndcg@5", "recall@5", "mrr", "coverage@5"):
        assert merged[key] == pytest.approx(whole[key], abs=1e-12)
    assert merged["users"] == 4 and evaluations[0]["users"] == 4


def test_evaluation_rounds_follow_eval_every_and_always_include_the_last():
    strategy = ItemTowerStrategy(FedAvg(), expected_arrays=array_spec(tower(0.0)), num_rounds=7, eval_every=3)
    assert [r for r in range(1, 8) if strategy.wants_evaluation(r)] == [3, 6, 7]


def test_server_optimizer_state_round_trips():
    # Prepare: one FedAdam aggregation creates its moments.
    inner = FedAdam(eta=0.1)
    strategy = ItemTowerStrategy(inner, expected_arrays=array_spec(tower(0.0)), num_rounds=3)
    inner.current_arrays = {k: a.numpy() for k, a in tower(0.0).items()}  # as configure_train sets it
    strategy.aggregate_train(1, [reply(1, tower(1.0))])
    state = strategy_state(inner)
    # Execute: restore into a fresh FedAdam.
    fresh = FedAdam(eta=0.1)
    restore_strategy_state(fresh, state)
    # Assert
    assert set(state) == {f"m_t/{k}" for k in KEYS} | {f"v_t/{k}" for k in KEYS}
    for key in KEYS:
        np.testing.assert_array_equal(fresh.m_t[key], inner.m_t[key])
        np.testing.assert_array_equal(fresh.v_t[key], inner.v_t[key])


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedyogi", "fedavgm", "fedtrimmedavg", "fedmedian", "krum"])
def test_every_named_strategy_builds(name):
    assert isinstance(build_inner_strategy(name, fraction_train=0.5), FedAvg)


def test_server_optimizer_settings_reach_flowers_fedadam_and_fedyogi():
    # Prepare / Execute
    adam = build_inner_strategy("fedadam", server_lr=0.006, server_beta_1=0.8, server_beta_2=0.999,
                                server_tau=1e-8)
    yogi = build_inner_strategy("fedyogi", server_tau=1e-6)
    # Assert
    assert (adam.eta, adam.beta_1, adam.beta_2, adam.tau) == (0.006, 0.8, 0.999, 1e-8)
    assert yogi.tau == 1e-6


def test_unknown_strategy_and_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="Unknown strategy 'fedsgd'"):
        build_inner_strategy("fedsgd")
    with pytest.raises(ValueError, match="eval_every must be at least 1"):
        ItemTowerStrategy(FedAvg(), expected_arrays=array_spec(tower(0.0)), num_rounds=3, eval_every=0)


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedyogi", "fedavgm", "fedtrimmedavg", "fedmedian", "krum"])
def test_every_strategy_aggregates_item_towers_through_the_wrapper(name):
    # Prepare: five well-formed replies (values 1..5) and one poisoned one.
    inner = build_inner_strategy(name, trim_beta=0.2, krum_byzantine=1)
    if hasattr(inner, "m_t"):  # FedOpt family keeps the outgoing arrays as NumPy
        inner.current_arrays = {k: a.numpy() for k, a in tower(0.0).items()}
    elif hasattr(inner, "momentum_vector"):
        inner.current_arrays = tower(0.0)
    strategy = ItemTowerStrategy(inner, expected_arrays=array_spec(tower(0.0)), num_rounds=3)
    strategy.current_arrays = tower(0.0)
    replies = [reply(n, tower(float(n))) for n in range(1, 6)] + [reply(9, tower(float("inf")))]
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: a finite tower of the right shapes came out, and the poisoned reply was named.
    assert set(arrays.keys()) == set(KEYS)
    values = arrays[KEYS[0]].numpy()
    assert np.isfinite(values).all() and values.shape == (4, 2)
    # In the tower's own dtype (FedAdam/FedYogi compute in float64), so a checkpoint matches it on resume.
    assert array_spec(arrays) == array_spec(tower(0.0))
    if name in ("fedavg", "fedmedian", "fedtrimmedavg"):
        np.testing.assert_allclose(values, 3.0)  # mean, median and trimmed mean of 1..5 are all 3
    assert [node for _, node, _ in strategy.rejected] == [9]


def test_the_plain_loops_fedadam_step_is_flowers():
    # Prepare: the same mean of replies through Flower's FedAdam and the plain loop's server step, twice.
    import torch

    from fedtower.config import RunSettings
    from fedtower.simulations.plain import server_step

    settings = RunSettings(strategy="fedadam", server_lr=0.01, server_beta_2=0.999, server_tau=1e-8)
    flower = build_inner_strategy("fedadam", **{"server_lr": 0.01, "server_beta_2": 0.999, "server_tau": 1e-8})
    current, moments = tower(0.0), {"m": {}, "v": {}}
    for server_round, value in ((1, 0.3), (2, -0.1)):
        flower.current_arrays = {k: a.numpy() for k, a in current.items()}
        # Execute
        expected, _ = flower.aggregate_train(server_round, [reply(1, tower(value)), reply(2, tower(value))])
        got = server_step(settings, server_round, {k: torch.from_numpy(a.numpy().copy()) for k, a in current.items()},
                          {k: torch.full_like(torch.from_numpy(a.numpy()), value) for k, a in current.items()},
                          moments)  # fmt: skip
        # Assert
        for key in KEYS:
            np.testing.assert_allclose(got[key].numpy(), expected[key].numpy(), rtol=1e-5, atol=1e-7)
        current = ArrayRecord({k: Array(v.numpy()) for k, v in got.items()})
