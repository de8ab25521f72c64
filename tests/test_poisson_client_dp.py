"""Client-level DP with secret Poisson sampling, attacked as a reader of the model (or another client) would:
the sample is unpredictable from the run config and seed, one client moves the release by at most clip / (q N)
whatever it sends, the noise has the documented size, the denominator never reveals who replied, and every
round is accounted (golden epsilons from Opacus's RDP analysis)."""

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from opacus.accountants import RDPAccountant

from fedtower.strategies.client_dp import accountant_state, client_dp_epsilon, restore_accountant_state
from fedtower.strategies.item_tower import FederationFinished, array_spec
from fedtower.strategies.poisson_client_dp import PoissonClientDP
from tests.test_client_dp import KEYS, Roster, moved, reply_to, task_identity, tower

DELTA = 1e-5


@pytest.fixture(autouse=True)
def identity():
    with task_identity():
        yield


def strategy(**overrides) -> PoissonClientDP:
    arguments = {"sample_rate": 0.5, "noise_multiplier": 1.0, "clipping_norm": 1.0, "population_size": 8,
                 "target_delta": DELTA, "expected_arrays": array_spec(tower(0.0)), "min_train_nodes": 1,
                 "min_available_nodes": 1, "min_evaluate_nodes": 1, **overrides}  # fmt: skip
    return PoissonClientDP(**arguments)


def chosen(dp: PoissonClientDP, server_round: int, nodes) -> list[int]:
    return sorted(m.metadata.dst_node_id for m in dp.configure_train(server_round, tower(0.0), ConfigRecord(),
                                                                      Roster(nodes)))  # fmt: skip


def release(dp: PoissonClientDP, server_round: int, global_arrays: ArrayRecord, sent_back: dict):
    """One round: the chosen nodes among `sent_back` reply with their arrays; returns (tower, chosen)."""
    messages = list(dp.configure_train(server_round, global_arrays, ConfigRecord(), Roster(sent_back)))
    replies = [reply_to(m, sent_back[m.metadata.dst_node_id]) for m in messages]
    arrays, _ = dp.aggregate_train(server_round, replies)
    return arrays, [m.metadata.dst_node_id for m in messages]


def test_the_sample_is_secret_from_the_seed_and_round():
    # Prepare: a coordinator's view: the same strategy settings, the same seeded `random`, the same round.
    nodes = list(range(1, 201))
    samples = []
    for _ in range(2):
        random.seed(1234)  # ItemTowerStrategy seeds Python's random per round; Flower samples with it
        np.random.seed(1234)
        # Execute
        samples.append(chosen(strategy(population_size=200), 1, nodes))
    # Assert: two samples of 200 at rate 0.5 coincide with probability 2^-200.
    assert samples[0] != samples[1]


def test_the_sample_is_poisson_at_the_rate():
    # Prepare / Execute: 400 rounds over 50 nodes at rate 0.2.
    dp = strategy(sample_rate=0.2, population_size=50)
    counts = [len(chosen(dp, r, range(50))) for r in range(1, 401)]
    # Assert: mean 10 (std of the mean 2.83 / 20 = 0.14) and the binomial spread (variance 8), not a fixed size.
    assert np.mean(counts) == pytest.approx(10, abs=0.6)
    assert np.var(counts) == pytest.approx(8, rel=0.3)


def test_one_client_moves_the_release_by_at_most_clip_over_the_expected_count():
    # Prepare: 4 of 4 chosen (rate 1.0, expected count 4); one client sends a huge update, the others the
    # global tower back moved by 0.01 in one entry.
    dp = strategy(sample_rate=1.0, population_size=4, noise_multiplier=1e-9, clipping_norm=0.5)
    base = tower(0.0)
    small = moved(base, {(KEYS[0], (0, 0)): 0.01})
    huge = moved(base, {(KEYS[0], (1, 1)): 1e6})

    # Execute
    arrays, _ = release(dp, 1, base, {1: small, 2: small, 3: small, 4: huge})

    # Assert: (3 x 0.01 + 0) / 4 in entry (0, 0); the huge one clipped to 0.5, over 4.
    values = arrays[KEYS[0]].numpy()
    assert values[0, 0] == pytest.approx(0.03 / 4, abs=1e-6)
    assert values[1, 1] == pytest.approx(0.5 / 4, abs=1e-6)


def test_the_denominator_is_the_expected_count_not_the_replies():
    # Prepare: rate 0.5 over 8 (expected 4); whoever is chosen moves one entry by 0.1.
    dp = strategy(noise_multiplier=1e-9)
    base = tower(0.0)
    sent = {n: moved(base, {(KEYS[1], (0, 0)): 0.1}) for n in range(1, 9)}

    # Execute
    arrays, who = release(dp, 1, base, sent)

    # Assert: 0.1 x (number chosen) / 4, so the release does not average away who replied.
    assert arrays[KEYS[1]].numpy()[0, 0] == pytest.approx(0.1 * len(who) / 4, abs=1e-6)


def test_the_noise_has_the_documented_standard_deviation():
    # Prepare: a 10,000-value tower nobody updates (everyone sends it back unchanged).
    base = ArrayRecord({"w": Array(np.zeros((100, 100), dtype=np.float32))})
    dp = strategy(expected_arrays=array_spec(base), noise_multiplier=2.0, clipping_norm=0.5, sample_rate=0.5)

    # Execute
    arrays, _ = release(dp, 1, base, dict.fromkeys(range(1, 9), base))

    # Assert: std = noise multiplier x clip / (q N) = 2 x 0.5 / 4 = 0.25, within 5%.
    noise = arrays["w"].numpy().astype(np.float64)
    assert noise.std() == pytest.approx(0.25, rel=0.05)
    assert abs(noise.mean()) < 4 * 0.25 / 100


def test_every_round_is_accounted_including_an_empty_one_and_a_rejected_reply():
    # Prepare: golden epsilons from Opacus's RDP accountant for rate 0.5, noise 1.0.
    golden = RDPAccountant()
    dp = strategy()
    base = tower(0.0)
    nan = ArrayRecord({KEYS[0]: Array(np.full((4, 2), np.nan, dtype=np.float32)),
                       KEYS[1]: Array(np.zeros((4, 1), dtype=np.float32))})  # fmt: skip

    for server_round in (1, 2, 3):
        # Execute: round 2 gets only non-finite towers back (rejected, they contribute nothing).
        sent = dict.fromkeys(range(1, 9), nan if server_round == 2 else moved(base, {(KEYS[0], (0, 0)): 0.1}))
        arrays, _ = release(dp, server_round, base, sent)
        golden.step(noise_multiplier=1.0, sample_rate=0.5)
        # Assert: a finite tower came out and the round was charged.
        assert all(np.isfinite(arrays[k].numpy()).all() for k in KEYS)
        assert client_dp_epsilon(dp) == pytest.approx(golden.get_epsilon(DELTA), rel=1e-9)
    # A round with no one chosen (the replies never come) is still a noisy release, and charged.
    dp.configure_train(4, base, ConfigRecord(), Roster(range(1, 9)))
    arrays, _ = dp.aggregate_train(4, [])
    golden.step(noise_multiplier=1.0, sample_rate=0.5)
    assert not np.array_equal(arrays[KEYS[0]].numpy(), base[KEYS[0]].numpy())
    assert client_dp_epsilon(dp) == pytest.approx(golden.get_epsilon(DELTA), rel=1e-9)


def test_the_accountant_resumes_and_the_budget_stops_the_run_before_a_round_past_it():
    # Prepare: two rounds spent, then a checkpoint.
    dp = strategy()
    base = tower(0.0)
    for server_round in (1, 2):
        release(dp, server_round, base, dict.fromkeys(range(1, 9), base))
    state = accountant_state(dp)

    # Execute: a resumed strategy whose cap is the epsilon of exactly those two rounds.
    resumed = strategy(max_epsilon=client_dp_epsilon(dp) * 1.0001)
    restore_accountant_state(resumed, state)

    # Assert: it continues from two rounds and refuses a third.
    assert client_dp_epsilon(resumed) == pytest.approx(client_dp_epsilon(dp))
    with pytest.raises(FederationFinished, match="past max-epsilon"):
        resumed.configure_train(3, base, ConfigRecord(), Roster(range(1, 9)))


def test_a_population_other_than_the_accounted_one_refuses_the_round():
    with pytest.raises(ValueError, match="accounted for a population of 8"):
        strategy().configure_train(1, tower(0.0), ConfigRecord(), Roster(range(1, 10)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sample_rate": 0.0}, "sample_rate must be in \\(0, 1\\]"),
        ({"noise_multiplier": -1.0}, "noise_multiplier must be a positive number"),
        ({"clipping_norm": float("nan")}, "clipping_norm must be a positive number"),
        ({"population_size": 0}, "population_size must be a whole number of at least 1"),
        ({"target_delta": 1.0}, "target_delta must be strictly between 0 and 1"),
        ({"max_epsilon": 0.0}, "max_epsilon must be a positive number"),
    ],
)
def test_invalid_settings_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        strategy(**overrides)
