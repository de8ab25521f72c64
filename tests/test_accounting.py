"""Privacy accounting: the client's Opacus-backed RDP accountant and the independent one auditors use."""

import json
import math
import warnings

import pytest
from opacus.accountants import RDPAccountant

from fedtower.privacy.accounting import (
    DEFAULT_ORDERS,
    ClientAccountant,
    _log_erfc,
    default_delta,
    independent_epsilon,
    noise_multiplier_for,
)

DELTA = 1e-5
# FLOWER_NOTES: 10 local epochs at sampling rate 1/7 is 70 steps.
NOTES_RATE = 1 / 7
NOTES_STEPS = 70


def opacus_epsilon(history, delta):
    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accountant.get_epsilon(delta=delta)


# ---------------------------------------------------------------- golden values


@pytest.mark.parametrize(
    ("target_epsilon", "expected_noise", "rounded"),
    [(1.0, 5.1171875, 5.12), (8.0, 1.103515625, 1.10)],
)
def test_noise_multipliers_of_flower_notes(target_epsilon, expected_noise, rounded):
    # Execute
    noise = noise_multiplier_for(
        target_epsilon=target_epsilon, target_delta=DELTA, sample_rate=NOTES_RATE, steps=NOTES_STEPS
    )

    # Assert: the values FLOWER_NOTES quotes, and ε lands just under the target.
    assert noise == expected_noise
    assert round(noise, 2) == rounded
    accountant = ClientAccountant([(noise, NOTES_RATE, NOTES_STEPS)])
    assert target_epsilon - 0.01 <= accountant.epsilon(delta=DELTA) <= target_epsilon


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        ([(1.1, NOTES_RATE, 70)], 8.037037576470452),
        ([(5.1171875, NOTES_RATE, 70)], 0.9918889811825784),
        ([(1.0, 1.0, 10)], 19.05359753163139),
        ([(1.0, 0.01, 1000)], 2.1013652716430564),
    ],
)
def test_epsilon_golden_values(history, expected):
    # Prepare
    accountant = ClientAccountant(history)

    # Execute
    epsilon = accountant.epsilon(delta=DELTA)

    # Assert
    assert epsilon == pytest.approx(expected, rel=1e-12)


def test_the_gaussian_mechanism_without_sampling_has_its_closed_form():
    # Prepare: q = 1, so RDP is T·α/(2σ²) at every order α.
    noise, steps = 2.0, 3

    # Execute
    epsilon = independent_epsilon(history=[(noise, 1.0, steps)], delta=DELTA)

    # Assert
    expected = min(
        steps * a / (2 * noise**2) - (math.log(DELTA) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        for a in DEFAULT_ORDERS
    )
    assert epsilon == pytest.approx(expected, rel=1e-15)
    assert epsilon == pytest.approx(4.011321708510027, rel=1e-12)


def test_default_delta_is_a_tenth_of_one_over_n():
    # Execute / Assert
    assert default_delta(1000) == 1e-4
    assert default_delta(1) == 0.1
    assert default_delta(7) < 1 / 7


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "10"])
def test_default_delta_needs_a_positive_count(bad):
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        default_delta(bad)


# ---------------------------------------------------------------- independent accountant vs Opacus


def test_the_independent_accountant_searches_opacus_default_orders():
    assert list(DEFAULT_ORDERS) == RDPAccountant.DEFAULT_ALPHAS


@pytest.mark.parametrize(
    "history",
    [
        [(1.1, NOTES_RATE, 70)],
        [(5.1171875, NOTES_RATE, 70)],
        [(1.0, 1.0, 10)],  # q = 1: no subsampling
        [(3.0, 1.0, 500)],
        [(1.0, 0.01, 1000)],
        [(0.5, 0.3, 5)],  # small noise: the fractional series reaches far into erfc's tail
        [(0.3, 0.01, 100)],
        [(0.8, 0.001, 10000), (1.2, 0.05, 30), (1.2, 1.0, 2)],  # composed across rounds
        [(2.0, 0.999, 3)],
        [(100.0, 0.9, 1)],
    ],
)
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_the_independent_accountant_agrees_with_opacus(history, delta):
    # Execute
    independent = independent_epsilon(history=history, delta=delta)

    # Assert
    assert independent == pytest.approx(opacus_epsilon(history, delta), rel=1e-6)


def test_an_empty_history_has_spent_nothing():
    assert independent_epsilon(history=[], delta=DELTA) == 0.0
    assert ClientAccountant().epsilon(delta=DELTA) == 0.0


@pytest.mark.parametrize("x", [25.0, 25.5, 26.0, 26.5])
def test_log_erfc_asymptotic_branch_matches_erfc_where_it_still_is_a_normal_float(x):
    assert _log_erfc(x) == pytest.approx(math.log(math.erfc(x)), rel=1e-14)


def test_independent_epsilon_names_a_bad_history_entry():
    with pytest.raises(ValueError, match=r"history\[1\] \(sample_rate\)"):
        independent_epsilon(history=[(1.0, 0.1, 5), (1.0, 1.5, 5)], delta=DELTA)


# ---------------------------------------------------------------- ClientAccountant


def test_steps_with_the_same_parameters_merge_into_the_last_entry():
    # Prepare
    accountant = ClientAccountant()

    # Execute
    accountant.step(noise_multiplier=1.0, sample_rate=0.1, steps=5)
    accountant.step(noise_multiplier=1.0, sample_rate=0.1, steps=7)
    accountant.step(noise_multiplier=2.0, sample_rate=0.1, steps=3)
    accountant.step(noise_multiplier=1.0, sample_rate=0.1, steps=1)

    # Assert: only the last entry merges, as in Opacus.
    assert accountant.history == [(1.0, 0.1, 12), (2.0, 0.1, 3), (1.0, 0.1, 1)]
    assert accountant.total_steps == 16


def test_a_round_of_steps_equals_opacus_stepping_one_at_a_time():
    # Prepare
    opacus = RDPAccountant()
    for _ in range(NOTES_STEPS):
        opacus.step(noise_multiplier=1.1, sample_rate=NOTES_RATE)
    for _ in range(3):
        opacus.step(noise_multiplier=0.9, sample_rate=0.2)
    accountant = ClientAccountant()

    # Execute
    accountant.step(noise_multiplier=1.1, sample_rate=NOTES_RATE, steps=NOTES_STEPS)
    accountant.step(noise_multiplier=0.9, sample_rate=0.2, steps=3)

    # Assert
    assert accountant.history == opacus.history
    assert accountant.epsilon(delta=DELTA) == opacus.get_epsilon(delta=DELTA)


def test_epsilon_after_predicts_without_changing_the_accountant():
    # Prepare
    accountant = ClientAccountant([(1.1, NOTES_RATE, 70)])
    before = accountant.epsilon(delta=DELTA)

    # Execute
    predicted = accountant.epsilon_after(delta=DELTA, noise_multiplier=1.1, sample_rate=NOTES_RATE, steps=70)

    # Assert
    assert accountant.history == [(1.1, NOTES_RATE, 70)]
    assert accountant.epsilon(delta=DELTA) == before == pytest.approx(8.037037576470452)
    accountant.step(noise_multiplier=1.1, sample_rate=NOTES_RATE, steps=70)
    assert accountant.epsilon(delta=DELTA) == predicted
    assert predicted == pytest.approx(opacus_epsilon([(1.1, NOTES_RATE, 140)], DELTA), rel=1e-12)
    assert predicted > before


def test_the_history_property_is_a_copy():
    accountant = ClientAccountant([(1.0, 0.1, 5)])
    accountant.history.append((9.0, 0.9, 9))
    assert accountant.history == [(1.0, 0.1, 5)]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"noise_multiplier": 0.0, "sample_rate": 0.1, "steps": 1}, "noise_multiplier must be a positive"),
        ({"noise_multiplier": math.nan, "sample_rate": 0.1, "steps": 1}, "noise_multiplier must be a positive"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.0, "steps": 1}, r"sample_rate must be a number in \(0, 1\]"),
        ({"noise_multiplier": 1.0, "sample_rate": 1.01, "steps": 1}, r"sample_rate must be a number in \(0, 1\]"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 0}, "steps must be a positive integer"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 2.5}, "steps must be a positive integer"),
    ],
)
def test_step_refuses_bad_parameters(arguments, message):
    accountant = ClientAccountant()
    with pytest.raises(ValueError, match=message):
        accountant.step(**arguments)
    assert accountant.history == []


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, "1e-5"])
def test_epsilon_needs_a_delta_in_the_open_unit_interval(delta):
    with pytest.raises(ValueError, match=r"delta must be a number in \(0, 1\)"):
        ClientAccountant().epsilon(delta=delta)


# ---------------------------------------------------------------- state


def test_state_round_trips_through_json():
    # Prepare
    accountant = ClientAccountant()
    accountant.step(noise_multiplier=1.1, sample_rate=NOTES_RATE, steps=70)
    accountant.step(noise_multiplier=0.7, sample_rate=0.02, steps=400)

    # Execute
    text = json.dumps(accountant.state_dict())
    restored = ClientAccountant.from_state_dict(json.loads(text))

    # Assert
    assert json.loads(text) == {
        "mechanism": "rdp",
        "history": [[1.1, NOTES_RATE, 70], [0.7, 0.02, 400]],
        "format": 1,
    }
    assert restored.history == accountant.history
    assert restored.epsilon(delta=DELTA) == accountant.epsilon(delta=DELTA)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (None, "must be a dict"),
        ({}, "no 'format', 'history', 'mechanism' field"),
        ({"mechanism": "rdp", "format": 1}, "no 'history' field"),
        ({"history": [], "mechanism": "rdp"}, "no 'format' field"),
        ({"history": [], "mechanism": "prv", "format": 1}, "'mechanism' is 'prv'"),
        ({"history": [], "mechanism": "rdp", "format": 2}, "'format' is 2"),
        ({"history": [], "mechanism": "rdp", "format": 1, "extra": 0}, r"unknown fields \['extra'\]"),
        ({"history": "[[1.0, 0.1, 5]]", "mechanism": "rdp", "format": 1}, "history must be a list"),
        ({"history": [[1.0, 0.1]], "mechanism": "rdp", "format": 1}, r"history\[0\] must be a .* triple"),
        ({"history": [[1.0, 0.1, 5], [1.0, 2.0, 5]], "mechanism": "rdp", "format": 1}, r"history\[1\] \(sample_rate\)"),
        ({"history": [[-1.0, 0.1, 5]], "mechanism": "rdp", "format": 1}, r"history\[0\] \(noise_multiplier\)"),
        ({"history": [[1.0, 0.1, "5"]], "mechanism": "rdp", "format": 1}, r"history\[0\] \(steps\)"),
    ],
)
def test_a_bad_state_is_refused_and_the_history_kept(state, message):
    # Prepare
    accountant = ClientAccountant([(1.0, 0.1, 5)])

    # Execute / Assert: never silently empty.
    with pytest.raises(ValueError, match=message):
        accountant.load_state_dict(state)
    assert accountant.history == [(1.0, 0.1, 5)]


def test_opacus_own_state_dict_is_refused_for_lack_of_a_format():
    # Prepare
    opacus = RDPAccountant()
    opacus.step(noise_multiplier=1.0, sample_rate=0.1)

    # Execute / Assert
    with pytest.raises(ValueError, match="no 'format' field"):
        ClientAccountant().load_state_dict(opacus.state_dict())


# ---------------------------------------------------------------- noise for a budget


def test_an_unreachable_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="No noise multiplier up to 1e6 reaches"):
        noise_multiplier_for(target_epsilon=1e-6, target_delta=DELTA, sample_rate=NOTES_RATE, steps=NOTES_STEPS)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon must be a positive finite number"),
        ({"target_epsilon": math.inf}, "target_epsilon must be a positive finite number"),
        ({"target_delta": 1.0}, r"target_delta must be a number in \(0, 1\)"),
        ({"sample_rate": 0.0}, r"sample_rate must be a number in \(0, 1\]"),
        ({"steps": 0}, "steps must be a positive integer"),
    ],
)
def test_noise_multiplier_for_checks_its_arguments(arguments, message):
    base = {"target_epsilon": 1.0, "target_delta": DELTA, "sample_rate": NOTES_RATE, "steps": NOTES_STEPS}
    with pytest.raises(ValueError, match=message):
        noise_multiplier_for(**(base | arguments))
