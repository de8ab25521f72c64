"""Client-level DP through Flower's wrappers: clipping, noise, accountant, settings, client-side mod."""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, Krum
from opacus.accountants import RDPAccountant

from fedtower.strategies.client_dp import (
    SecureServerSideFixedClipping,
    accountant_state,
    client_dp_epsilon,
    restore_accountant_state,
    wrap_client_level_dp,
)
from fedtower.strategies.item_tower import ItemTowerStrategy, array_spec, build_inner_strategy
from tests.flower_utils import node_context, task_identity

KEYS = ("item_tower.id_embedding.weight", "item_tower.bias.weight")
DELTA = 1e-5
# dp-accounting's default RDP orders, which Flower's RdpAccountant uses.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
# Epsilon at delta 1e-5 after T rounds of the Gaussian mechanism with noise multiplier 1, no
# amplification: min over those orders a of  T*a/2 + log(1 - 1/a) - log(delta*a)/(a - 1)
# (best orders 5.4, 4.2, 3.6). Opacus reproduces them below.
GOLDEN_EPSILON = {1: 4.728507067217623, 2: 7.077391578166641, 3: 9.009958991683897}


class Roster:
    """The one thing FedAvg.configure_train asks of a Grid: the connected node ids."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


@pytest.fixture(autouse=True)
def identity():
    with task_identity():
        yield


@pytest.fixture(autouse=True)
def numpy_global_rng():
    # Flower draws its noise from NumPy's global generator; leave it as we found it.
    state = np.random.get_state()
    yield
    np.random.set_state(state)


def fedavg() -> FedAvg:
    """fedtower's FedAvg (Flower's default would wait for 2 nodes where a test has 1)."""
    return build_inner_strategy("fedavg")


def settings(**overrides):
    return {"mode": "server-side", "noise_multiplier": 1.0, "clipping_norm": 1.0, "num_sampled_clients": 2,
            "target_delta": DELTA, "population_size": 2, **overrides}  # fmt: skip


def tower(value: float) -> ArrayRecord:
    return ArrayRecord({
        KEYS[0]: Array(np.full((4, 2), value, dtype=np.float32)),
        KEYS[1]: Array(np.full((4, 1), value, dtype=np.float32)),
    })  # fmt: skip


def moved(arrays: ArrayRecord, steps: dict) -> ArrayRecord:
    """`arrays` with single entries moved: {(key, index): step}."""
    values = {key: array.numpy().copy() for key, array in arrays.items()}
    for (key, index), step in steps.items():
        values[key][index] += step
    return ArrayRecord({key: Array(value) for key, value in values.items()})


def reply_to(message: Message, arrays: ArrayRecord, examples: float = 1.0) -> Message:
    metrics = MetricRecord({"num-examples": examples, "train-loss": 1.0})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)


def train_round(strategy, server_round, global_arrays, sent_back: dict, weights: dict | None = None):
    """One round with every node in `sent_back` ({node id: arrays}); returns the aggregate and the replies."""
    messages = strategy.configure_train(server_round, global_arrays, ConfigRecord(), Roster(sent_back))
    replies = {
        m.metadata.dst_node_id: reply_to(m, sent_back[m.metadata.dst_node_id],
                                         (weights or {}).get(m.metadata.dst_node_id, 1.0))
        for m in messages
    }  # fmt: skip
    arrays, _ = strategy.aggregate_train(server_round, list(replies.values()))
    return arrays, replies


def update_norm(arrays: ArrayRecord, base: ArrayRecord) -> float:
    return float(np.sqrt(sum(np.sum((arrays[k].numpy() - base[k].numpy()) ** 2.0) for k in base.keys())))


# ------------------------------------------------------------------ settings
def test_off_returns_the_inner_strategy_itself():
    # Prepare: any strategy goes through untouched when client-level DP is off.
    for inner in (FedAvg(), FedAdam()):
        # Execute
        strategy = wrap_client_level_dp(inner, **settings(mode="off"))
        # Assert
        assert strategy is inner
        assert client_dp_epsilon(strategy) is None and accountant_state(strategy) is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "local"}, "mode must be one of off, server-side, client-side, got 'local'."),
        ({"noise_multiplier": 0.0}, "noise_multiplier must be a positive number"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier must be a positive number"),
        ({"clipping_norm": -1.0}, "clipping_norm must be a positive number, got -1.0."),
        ({"num_sampled_clients": 0}, "num_sampled_clients must be a whole number of at least 1, got 0."),
        ({"num_sampled_clients": 2.0}, "num_sampled_clients must be a whole number"),
        ({"population_size": 1}, "population_size must be a whole number no smaller than num_sampled_clients (2)"),
        ({"target_delta": 0.0}, "target_delta must be strictly between 0 and 1, got 0.0."),
        ({"target_delta": 1.0}, "target_delta must be strictly between 0 and 1, got 1.0."),
        ({"max_epsilon": 0.0}, "max_epsilon must be a positive number (or None for no limit), got 0.0."),
    ],
)  # fmt: skip
def test_invalid_settings_are_named(overrides, message):
    with pytest.raises(ValueError) as err:
        wrap_client_level_dp(fedavg(), **settings(**overrides))
    assert message in str(err.value)


@pytest.mark.parametrize("inner", [FedAdam(), FedMedian(), Krum(), FedProx()], ids=lambda s: type(s).__name__)
def test_only_plain_fedavg_can_be_accounted(inner):
    with pytest.raises(ValueError) as err:
        wrap_client_level_dp(inner, **settings())
    assert f"needs a plain FedAvg inner strategy, got {type(inner).__name__}" in str(err.value)
    assert "FedAvg's unmodified aggregation" in str(err.value)


def test_fedavg_must_weight_by_the_examples_clients_set_to_one():
    with pytest.raises(ValueError, match="weight replies by 'num-examples'.*got weighted_by_key='samples'"):
        wrap_client_level_dp(FedAvg(weighted_by_key="samples"), **settings())


# -------------------------------------------------------------- accounting
def test_golden_epsilons_are_opacus_rdp_without_sampling():
    # An independent accountant: Opacus RDP with sample rate 1 (every round a full Gaussian mechanism).
    for rounds, expected in GOLDEN_EPSILON.items():
        accountant = RDPAccountant()
        for _ in range(rounds):
            accountant.step(noise_multiplier=1.0, sample_rate=1.0)
        assert accountant.get_epsilon(DELTA, alphas=RDP_ORDERS) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("mode", ["server-side", "client-side"])
def test_epsilon_grows_each_round_and_matches_the_golden_values(mode):
    # Prepare: 2 of a population of 10 per round; no amplification, so the 2/10 does not lower epsilon.
    strategy = wrap_client_level_dp(fedavg(), **settings(mode=mode))
    spent = [client_dp_epsilon(strategy)]
    # Execute
    for server_round in (1, 2, 3):
        train_round(strategy, server_round, tower(0.0), {1: tower(0.1), 2: tower(0.2)})
        spent.append(client_dp_epsilon(strategy))
    # Assert
    assert spent[0] == 0.0
    assert spent[1:] == pytest.approx([GOLDEN_EPSILON[1], GOLDEN_EPSILON[2], GOLDEN_EPSILON[3]], rel=1e-9)


def test_a_resumed_run_continues_the_accountant():
    # Prepare: two rounds, then the accountant's state goes through a JSON checkpoint.
    first = wrap_client_level_dp(fedavg(), **settings())
    for server_round in (1, 2):
        train_round(first, server_round, tower(0.0), {1: tower(0.1), 2: tower(0.2)})
    state = json.loads(json.dumps(accountant_state(first)))
    resumed = wrap_client_level_dp(fedavg(), **settings())
    # Execute
    restore_accountant_state(resumed, state)
    after_restore = client_dp_epsilon(resumed)
    train_round(resumed, 3, tower(0.0), {1: tower(0.1), 2: tower(0.2)})
    # Assert
    assert after_restore == pytest.approx(GOLDEN_EPSILON[2], rel=1e-9)
    assert client_dp_epsilon(resumed) == pytest.approx(GOLDEN_EPSILON[3], rel=1e-9)


def test_restoring_an_accountant_needs_client_level_dp():
    with pytest.raises(ValueError, match="does not use client-level DP"):
        restore_accountant_state(FedAvg(), {})


def test_a_round_past_max_epsilon_is_refused_before_training():
    # Prepare: one round costs 4.73, two cost 7.08; the budget is 5.
    strategy = wrap_client_level_dp(fedavg(), **settings(max_epsilon=5.0))
    train_round(strategy, 1, tower(0.0), {1: tower(0.1), 2: tower(0.2)})
    # Execute / Assert: round 2 is never sent out.
    with pytest.raises(PrivacyBudgetExhausted, match="would exceed max_epsilon"):
        strategy.configure_train(2, tower(0.0), ConfigRecord(), Roster([1, 2]))
    assert client_dp_epsilon(strategy) == pytest.approx(GOLDEN_EPSILON[1], rel=1e-9)


def test_the_sampled_count_must_equal_num_sampled_clients():
    # fedtower's FedAvg samples every connected node (fraction-train 1.0): 3 nodes where 2 were promised.
    strategy = wrap_client_level_dp(fedavg(), **settings())
    with pytest.raises(ValueError, match="does not match num_sampled_clients: 3 != 2"):
        strategy.configure_train(1, tower(0.0), ConfigRecord(), Roster([1, 2, 3]))


def test_unequal_client_weights_stop_the_round():
    strategy = wrap_client_level_dp(fedavg(), **settings())
    with pytest.raises(ValueError, match="Accounted aggregation requires equal client weights."):
        train_round(strategy, 1, tower(0.0), {1: tower(0.1), 2: tower(0.2)}, weights={1: 1.0, 2: 3.0})
    assert client_dp_epsilon(strategy) == 0.0


# ------------------------------------------------------- clipping and noise
def test_server_side_clips_each_update_to_the_norm_before_averaging():
    # Prepare: global tower 1.0; node 1 moves two entries by 3 and 4 (update norm 5 > clipping norm 1),
    # node 2 moves one entry by 0.5 (norm 0.5, left as is). Noise std 1e-9 * 1 / 2: negligible.
    strategy = wrap_client_level_dp(fedavg(), **settings(noise_multiplier=1e-9))
    start = tower(1.0)
    big = moved(start, {(KEYS[0], (0, 0)): 3.0, (KEYS[1], (0, 0)): 4.0})
    small = moved(start, {(KEYS[0], (1, 1)): 0.5})
    # Execute
    arrays, replies = train_round(strategy, 1, start, {1: big, 2: small})
    # Assert: node 1's update became (0.6, 0.8), norm exactly 1; the mean adds half of each update.
    assert update_norm(replies[1].content["arrays"], start) == pytest.approx(1.0, rel=1e-6)
    assert update_norm(replies[2].content["arrays"], start) == pytest.approx(0.5, rel=1e-6)
    expected_ids = np.ones((4, 2))
    expected_ids[0, 0], expected_ids[1, 1] = 1 + 0.6 / 2, 1 + 0.5 / 2
    expected_bias = np.ones((4, 1))
    expected_bias[0, 0] = 1 + 0.8 / 2
    np.testing.assert_allclose(arrays[KEYS[0]].numpy(), expected_ids, atol=1e-6)
    np.testing.assert_allclose(arrays[KEYS[1]].numpy(), expected_bias, atol=1e-6)


@pytest.mark.parametrize("population", [4, 10], ids=["everyone", "a-fixed-sample"])
def test_noise_has_the_documented_standard_deviation(population):
    # Prepare: 4 clients move every value of a 10,000-value tower by 0.001 (norm 0.1, not clipped), so
    # aggregate minus 0.001 is the noise alone, with std noise_multiplier * clipping_norm /
    # num_sampled_clients = 2 * 0.5 / 4 = 0.25, whether the 4 are everyone or a sample of 10.
    start = ArrayRecord({"w": Array(np.zeros((100, 100), dtype=np.float32))})
    step = ArrayRecord({"w": Array(np.full((100, 100), 0.001, dtype=np.float32))})
    strategy = wrap_client_level_dp(fedavg(), **settings(noise_multiplier=2.0, clipping_norm=0.5,
                                                         num_sampled_clients=4, population_size=population))
    np.random.seed(2024)
    # Execute
    arrays, _ = train_round(strategy, 1, start, dict.fromkeys((1, 2, 3, 4), step))
    noise = arrays["w"].numpy().astype(np.float64) - 0.001
    # Assert: std within 5% (about 7 standard errors at 10,000 draws), mean within 4 standard errors.
    assert noise.std() == pytest.approx(0.25, rel=0.05)
    assert abs(noise.mean()) < 4 * 0.25 / 100


def test_flower_cannot_clip_an_update_of_zero():
    # Flower 1.41 divides the clipping norm by the update's norm, so a client that sends the global
    # arrays back unchanged stops a server-side round (and fails in fixedclipping_mod client-side).
    strategy = wrap_client_level_dp(fedavg(), **settings())
    with pytest.raises(ZeroDivisionError):
        train_round(strategy, 1, tower(0.0), {1: tower(0.0), 2: tower(0.1)})


def test_client_side_mode_sends_the_norm_and_fixedclipping_mod_clips_on_the_client():
    # Prepare: one sampled node whose local training moves two entries by 3 and 4 (norm 5).
    strategy = wrap_client_level_dp(fedavg(), **settings(mode="client-side", noise_multiplier=1e-9,
                                                         num_sampled_clients=1))  # fmt: skip
    start = tower(1.0)
    (message,) = strategy.configure_train(1, start, ConfigRecord(), Roster([7]))

    def local_training(msg: Message, context) -> Message:  # the ClientApp's train handler
        return reply_to(msg, moved(msg.content["arrays"], {(KEYS[0], (0, 0)): 3.0, (KEYS[1], (0, 0)): 4.0}))

    # Execute
    reply = fixedclipping_mod(message, node_context({}, {}), local_training)
    arrays, _ = strategy.aggregate_train(1, [reply])
    # Assert: the norm travelled in the train config; the update left the client as (0.6, 0.8).
    assert message.content["config"]["clipping_norm"] == 1.0
    assert update_norm(reply.content["arrays"], start) == pytest.approx(1.0, rel=1e-6)
    assert arrays[KEYS[0]].numpy()[0, 0] == pytest.approx(1.6, abs=1e-6)
    assert arrays[KEYS[1]].numpy()[0, 0] == pytest.approx(1.8, abs=1e-6)


def test_fixedclipping_mod_belongs_on_the_train_handler_only():
    # Evaluate messages carry no clipping norm, so the mod answers them with an error.
    strategy = wrap_client_level_dp(fedavg(), **settings(mode="client-side", num_sampled_clients=1))
    (message,) = strategy.configure_evaluate(1, tower(0.0), ConfigRecord(), Roster([7]))
    reply = fixedclipping_mod(message, node_context({}, {}), lambda msg, context: reply_to(msg, tower(0.0)))
    assert reply.has_error() and "clipping_norm" in reply.error.reason


def test_a_reply_rejected_by_the_item_tower_wrapper_cancels_the_release():
    # Prepare: the DP wrapper inside fedtower's item-tower wrapper; node 2 sends NaN, which the
    # item-tower wrapper drops, leaving 1 of the 2 replies Flower's accountant was promised.
    dp = wrap_client_level_dp(fedavg(), **settings())
    strategy = ItemTowerStrategy(dp, expected_arrays=array_spec(tower(0.0)), num_rounds=3)
    # Execute
    arrays, _ = train_round(strategy, 1, tower(0.0), {1: tower(0.1), 2: tower(float("nan"))})
    # Assert: nothing released, nothing spent; the next round still works and is accounted.
    assert arrays is None and client_dp_epsilon(dp) == 0.0
    arrays, _ = train_round(strategy, 2, tower(0.0), {1: tower(0.1), 2: tower(0.2)})
    assert arrays is not None and client_dp_epsilon(dp) == pytest.approx(GOLDEN_EPSILON[1], rel=1e-9)


# ------------------------------------------------- server optimizer over the DP mean
class RecordingWrapper(SecureServerSideFixedClipping):
    """fedtower's server-side DP wrapper that also remembers what it released."""

    def aggregate_train(self, *args):
        arrays, metrics = super().aggregate_train(*args)
        self.released = [*getattr(self, "released", []), arrays]
        return arrays, metrics


def test_fedadam_over_a_plain_mean_is_flowers_fedadam_bit_for_bit():
    # Prepare: the same two replies go to Flower's FedAdam and to FedAdamOverDPMean stepping from a FedAvg.
    from fedtower.strategies.client_dp import optimizer_over_dp_mean

    arguments = {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.999, "tau": 1e-8, "min_train_nodes": 1,
                 "min_available_nodes": 1, "min_evaluate_nodes": 1}  # fmt: skip
    flower = FedAdam(**arguments)
    ours = optimizer_over_dp_mean("fedadam", fedavg(), **arguments)
    global_arrays = tower(0.0)
    sent = {1: moved(global_arrays, {(KEYS[0], (0, 0)): 0.3}), 2: moved(global_arrays, {(KEYS[1], (2, 0)): -0.1})}

    # Execute: two rounds each.
    for server_round in (1, 2):
        expected, _ = train_round(flower, server_round, global_arrays, sent)
        got, _ = train_round(ours, server_round, global_arrays, sent)
        # Assert
        for key in KEYS:
            np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy())
        global_arrays = got


def test_fedadam_steps_from_the_noisy_release_and_epsilon_is_the_wrappers():
    # Prepare: FedAdam over Flower's server-side DP wrapper, two clients, one update far above the clip.
    from fedtower.strategies.client_dp import optimizer_over_dp_mean

    wrapper = wrap_client_level_dp(fedavg(), **settings())
    wrapper.__class__ = RecordingWrapper
    eta, beta_1, beta_2, tau = 0.01, 0.9, 0.999, 1e-8
    strategy = optimizer_over_dp_mean("fedadam", wrapper, eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau,
                                      min_train_nodes=1, min_available_nodes=1)  # fmt: skip
    global_arrays = tower(0.0)
    sent = {1: moved(global_arrays, {(KEYS[0], (0, 0)): 1e6}), 2: moved(global_arrays, {(KEYS[0], (1, 1)): 0.5})}

    # Execute
    stepped, _ = train_round(strategy, 1, global_arrays, sent)

    # Assert: the step is Adam's first step computed by hand from the released (noisy) mean d:
    # m = (1 - b1) d, v = (1 - b2) d^2, x + eta * sqrt(1 - b2^2) / (1 - b1^2) * m / (sqrt(v) + tau).
    released = wrapper.released[0]
    for key in KEYS:
        d = released[key].numpy().astype(np.float64) - global_arrays[key].numpy()
        m, v = (1 - beta_1) * d, (1 - beta_2) * d**2
        eta_norm = eta * np.sqrt(1 - beta_2**2) / (1 - beta_1**2)
        np.testing.assert_allclose(stepped[key].numpy(), global_arrays[key].numpy() + eta_norm * m / (np.sqrt(v) + tau),
                                   rtol=1e-5, atol=1e-7)  # fmt: skip
    # The huge update was clipped before the noise: the release is within clip/2 of the mean plus noise
    # of std 1 * 1 / 2 (10 standard deviations is far beyond chance).
    assert abs(released[KEYS[0]].numpy()[0, 0]) < 0.5 + 10 * 0.5
    # Epsilon is the wrapper's own after one round: the optimizer adds nothing to it.
    assert client_dp_epsilon(strategy) == pytest.approx(GOLDEN_EPSILON[1], rel=1e-6)
    assert accountant_state(strategy) == accountant_state(wrapper)


def test_a_server_optimizer_over_the_dp_mean_is_only_fedadam_or_fedyogi():
    from fedtower.strategies.client_dp import optimizer_over_dp_mean

    with pytest.raises(ValueError, match="Only fedadam, fedyogi can step from a client-level DP mean"):
        optimizer_over_dp_mean("fedavgm", fedavg())


def test_the_calibrated_noise_reaches_the_golden_epsilons():
    # Prepare / Execute: the noise multiplier for each golden epsilon over its number of rounds.
    from fedtower.strategies.client_dp import calibrated_noise_multiplier

    for rounds, epsilon in GOLDEN_EPSILON.items():
        noise = calibrated_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA, rounds=rounds,
                                            population_size=10, num_sampled_clients=2)  # fmt: skip
        # Assert: noise multiplier 1 (to the bisection's 0.1%), never below it.
        assert 1.0 <= noise <= 1.001
    # A budget that needs more noise than the first guess doubles its way there: 20 rounds at epsilon 1.
    noise = calibrated_noise_multiplier(target_epsilon=1.0, target_delta=DELTA, rounds=20, population_size=10,
                                        num_sampled_clients=2)  # fmt: skip
    strategy = wrap_client_level_dp(fedavg(), **settings(noise_multiplier=noise))
    global_arrays = tower(0.0)
    for server_round in range(1, 21):
        train_round(strategy, server_round, global_arrays, {1: tower(0.1), 2: tower(0.2)})
    assert 0.998 <= client_dp_epsilon(strategy) <= 1.0


def test_a_partial_sample_is_accounted_at_twice_the_sensitivity_with_the_same_noise():
    # Prepare: noise multiplier 2 over 2 of 10 clients (a fixed-size sample of part of the population),
    # and the same over all 10.
    partial = wrap_client_level_dp(fedavg(), **settings(noise_multiplier=2.0, num_sampled_clients=2,
                                                        population_size=10))  # fmt: skip
    full = wrap_client_level_dp(fedavg(), **settings(noise_multiplier=2.0, num_sampled_clients=10,
                                                     population_size=10))  # fmt: skip
    global_arrays = tower(0.0)

    # Execute: one round each.
    train_round(partial, 1, global_arrays, {1: tower(0.1), 2: tower(0.2)})
    train_round(full, 1, global_arrays, {n: tower(0.1) for n in range(1, 11)})

    # Assert: the partial sample's accountant sees multiplier 1 (sensitivity 2 x clip), so it reports the
    # golden epsilon of multiplier 1; the full one sees 2. Both add noise of 2 x clip / n.
    assert client_dp_epsilon(partial) == pytest.approx(GOLDEN_EPSILON[1], rel=1e-6)
    assert client_dp_epsilon(full) < GOLDEN_EPSILON[1] / 2
    assert partial.noise_multiplier * partial.sensitivity_factor == 2.0
    assert full.noise_multiplier * full.sensitivity_factor == 2.0
