"""The distributed Skellam mechanism: its RDP bounds against exact divergences, its accounting in histories,
the ledger and the audit, and its secure noise sampler."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from flwr.common.serde import config_record_from_proto, config_record_to_proto
from opacus.accountants import RDPAccountant
from scipy import special, stats

from fedtower.privacy.accounting import (
    ClientAccountant,
    add_steps,
    checked_history,
    compose,
    epsilon_from_rdp,
    history_without,
    independent_epsilon,
    noise_multiplier_for,
    rdp_of_sampled_gaussian,
    skellam_entry,
)
from fedtower.privacy.audit import audit_records, dp_accounting_epsilons, epsilon_table_text, write_report
from fedtower.privacy.ledger import (
    LedgerEntry,
    LedgerMonitor,
    generate_signing_key,
    history_extends,
    public_key_text,
    record_digest,
    sign_entry,
    signed_from_config_record,
    signed_to_config_record,
    verify_entry,
)
from fedtower.privacy.secure_random import DPRandom
from fedtower.privacy.skellam import (
    SKELLAM_ORDERS,
    poisson_subsampled_rdp,
    secure_poisson,
    skellam_epsilon,
    skellam_noise,
    skellam_noise_multiplier_for,
    skellam_rdp,
)

DELTA = 1e-5
SK = ["skellam", 1.0, 0.02, 300, 256.0, 4096.0]  # z, q, steps, D2, D1
# skellam_epsilon of [SK] and of [[1.1, 0.05, 40], SK] at δ = 1e-5, computed twice: by this module, and by the
# variance form of the bound (google-research distributed_dp) with Zhu-Wang's sum in 60-digit mpmath.
GOLDEN_SK = 3.1316929815884245  # best order 6
GOLDEN_MIXED = 3.6038036286828854  # best order 5


# ---------------------------------------------------------------- exact divergences in one dimension


def skellam_log_pmf(k: np.ndarray, mu: float) -> np.ndarray:
    """log P(Sk(mu, mu) = k) = log(e^{-2 mu} I_|k|(2 mu)) = log ive(|k|, 2 mu)."""
    with np.errstate(divide="ignore"):
        return np.log(special.ive(np.abs(k), 2 * mu))


def support(mu: float, shift: int, order: int) -> np.ndarray:
    width = int(order * shift + 40 * math.sqrt(2 * mu) + 50)
    return np.arange(-width, width + 1)


def exact_skellam_rdp(mu: float, shift: int, order: int) -> float:
    """D_order(Sk(mu) + shift || Sk(mu)), summed over the integers (terms below e^-700 dropped)."""
    k = support(mu, shift, order)
    log_p, log_q = skellam_log_pmf(k - shift, mu), skellam_log_pmf(k, mu)
    keep = np.isfinite(log_p) & np.isfinite(log_q)
    return float(special.logsumexp(order * log_p[keep] + (1 - order) * log_q[keep]) / (order - 1))


def exact_mixture_rdps(mu: float, shift: int, order: int, q: float) -> tuple[float, float]:
    """D(M || P) and D(P || M) for P = Sk(mu), M = (1 - q) P + q (P + shift): add and remove one unit."""
    k = support(mu, shift, order)
    log_p, log_q = skellam_log_pmf(k, mu), skellam_log_pmf(k - shift, mu)
    keep = np.isfinite(log_p) & np.isfinite(log_q)
    log_p, log_q = log_p[keep], log_q[keep]
    log_m = np.logaddexp(math.log1p(-q) + log_p, math.log(q) + log_q)
    forward = special.logsumexp(order * log_m + (1 - order) * log_p) / (order - 1)
    backward = special.logsumexp(order * log_p + (1 - order) * log_m) / (order - 1)
    return float(forward), float(backward)


def one_dimensional(mu: float, shift: int) -> dict:
    """The noise multiplier and sensitivities of Sk(mu, mu) noise on a 1-D integer query of sensitivity `shift`."""
    return {"noise_multiplier": math.sqrt(2 * mu) / shift, "l2_sensitivity": shift, "l1_sensitivity": shift}


# ---------------------------------------------------------------- the Skellam bound


def test_the_skellam_bound_by_hand():
    # Prepare: mu = (z D2)^2 / 2 = 50: 2 * 100 / 200 + min((3 * 100 + 600) / (16 * 2500), 300 / 200).
    # mu = 1/2, alpha = 3: 3 / 2 + min((5 + 6) / 4, 3 / 2), the second branch of the min.
    # Execute
    small_price = skellam_rdp(order=2, noise_multiplier=1.0, l2_sensitivity=10, l1_sensitivity=100)
    large_price = skellam_rdp(order=3, noise_multiplier=1.0, l2_sensitivity=1, l1_sensitivity=1)
    # Assert
    assert small_price == pytest.approx(1.0 + 0.0225, rel=1e-15)
    assert large_price == pytest.approx(1.5 + 1.5, rel=1e-15)


@pytest.mark.parametrize("mu", [2.0, 10.0, 50.0, 500.0, 5000.0])
@pytest.mark.parametrize("shift", [1, 3])
def test_the_skellam_bound_holds_for_the_exact_divergence_in_one_dimension(mu, shift):
    for order in (2, 3, 5, 10, 20, 40):
        # Execute
        bound = skellam_rdp(order=order, **one_dimensional(mu, shift))
        exact = exact_skellam_rdp(mu, shift, order)
        # Assert: never below the truth; within 0.03% of it once mu is large (the price of integers vanishes).
        assert exact <= bound * (1 + 1e-9), (mu, shift, order)
        if mu >= 5000:
            assert bound <= exact * (1 + 3e-4), (mu, shift, order)


def test_the_skellam_bound_tends_to_the_gaussian_mechanism():
    # Prepare: noise multiplier 1.3 with ever finer quantization (D2 grows, D1 = D2^2 at worst).
    gaussian = 10 / (2 * 1.3**2)
    # Execute
    values = [skellam_rdp(order=10, noise_multiplier=1.3, l2_sensitivity=d2, l1_sensitivity=d2**2)
              for d2 in (4, 64, 1024)]  # fmt: skip
    # Assert
    assert values[0] > values[1] > values[2] > gaussian
    assert values[2] == pytest.approx(gaussian, rel=1e-5)


@pytest.mark.parametrize("bad", [{"order": 1}, {"order": 2.5}, {"order": True}, {"noise_multiplier": 0.0},
                                 {"l2_sensitivity": -1.0}, {"l1_sensitivity": math.inf}])  # fmt: skip
def test_the_skellam_bound_refuses_bad_parameters(bad):
    args = {"order": 2, "noise_multiplier": 1.0, "l2_sensitivity": 4.0, "l1_sensitivity": 16.0} | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        skellam_rdp(**args)


# ---------------------------------------------------------------- Poisson subsampling


def test_the_subsampled_bound_at_rate_one_is_the_base_mechanism():
    # Execute
    bounds = [poisson_subsampled_rdp(order=order, sample_rate=1.0, base_rdp=lambda a: 0.3 * a) for order in (2, 7, 256)]
    # Assert
    assert bounds == [0.6, 2.1, 0.3 * 256]


def test_the_subsampled_bound_by_hand_at_order_two():
    # Prepare: at alpha = 2 the sum is (1-q)(1+q) + q^2 e^eps(2) = 1 + q^2 (e^eps(2) - 1).
    q, eps2 = 0.1, 0.5
    # Execute
    bound = poisson_subsampled_rdp(order=2, sample_rate=q, base_rdp=lambda a: eps2)
    # Assert
    assert bound == pytest.approx(math.log1p(q**2 * math.expm1(eps2)), rel=1e-14)


def test_the_subsampled_bound_at_order_three_by_hand():
    # Prepare: (1-q)^2 (1 + 2q) + 3 q^2 (1-q) e^eps(2) + 3 q^3 e^(2 eps(3)), over 2.
    q, eps = 0.2, {2: 0.4, 3: 0.7}
    expected = math.log((1 - q) ** 2 * (1 + 2 * q) + 3 * q**2 * (1 - q) * math.exp(eps[2])
                        + 3 * q**3 * math.exp(2 * eps[3])) / 2  # fmt: skip
    # Execute
    bound = poisson_subsampled_rdp(order=3, sample_rate=q, base_rdp=eps.__getitem__)
    # Assert
    assert bound == pytest.approx(expected, rel=1e-14)


def test_large_orders_and_tiny_rates_neither_overflow_nor_lose_precision():
    # Execute
    huge = poisson_subsampled_rdp(order=256, sample_rate=0.5, base_rdp=lambda a: 50.0 * a)
    tiny = poisson_subsampled_rdp(order=2, sample_rate=1e-6, base_rdp=lambda a: 0.01)
    # Assert
    assert math.isfinite(huge) and huge > 0
    assert tiny == pytest.approx(1e-12 * math.expm1(0.01), rel=1e-9)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("q", [0.001, 0.01, 0.1, 0.5])
def test_with_a_gaussian_base_the_bound_is_above_the_exact_sampled_gaussian(sigma, q):
    for order in range(2, 65):
        # Execute
        exact = rdp_of_sampled_gaussian(noise_multiplier=sigma, sample_rate=q, order=order)
        bound = poisson_subsampled_rdp(order=order, sample_rate=q, base_rdp=lambda a: a / (2 * sigma**2))
        # Assert: at order 2 they are the same sum (up to rounding); above, the bound is looser, by at
        # most 3x where it matters (small rates, noise multipliers around 1).
        assert bound >= exact * (1 - 1e-9), (order, exact, bound)
        if q <= 0.01 and sigma <= 2.0:
            assert bound <= 3.0 * exact, (order, exact, bound)


@pytest.mark.parametrize("sigma, q", [(1.0, 0.001), (1.0, 0.01), (2.0, 0.01), (1.0, 0.05)])
def test_with_a_gaussian_base_the_epsilon_is_within_a_third_of_the_exact_one(sigma, q):
    # Prepare
    orders, steps = SKELLAM_ORDERS, 1000
    exact = [steps * rdp_of_sampled_gaussian(noise_multiplier=sigma, sample_rate=q, order=a) for a in orders]
    bound = [steps * poisson_subsampled_rdp(order=a, sample_rate=q, base_rdp=lambda b: b / (2 * sigma**2))
             for a in orders]  # fmt: skip
    # Execute
    eps_exact = epsilon_from_rdp(orders=orders, rdp=exact, delta=DELTA)[0]
    eps_bound = epsilon_from_rdp(orders=orders, rdp=bound, delta=DELTA)[0]
    # Assert
    assert eps_exact <= eps_bound <= 1.35 * eps_exact


@pytest.mark.parametrize("mu, shift", [(5.0, 1), (50.0, 1), (50.0, 3), (500.0, 3)])
@pytest.mark.parametrize("q", [0.01, 0.1, 0.5, 0.9])
def test_the_subsampled_skellam_bound_holds_for_the_exact_mixtures_both_ways(mu, shift, q):
    parameters = one_dimensional(mu, shift)
    for order in (2, 3, 4, 8, 16, 32):
        # Execute
        bound = poisson_subsampled_rdp(order=order, sample_rate=q,
                                       base_rdp=lambda a: skellam_rdp(order=a, **parameters))  # fmt: skip
        forward, backward = exact_mixture_rdps(mu, shift, order, q)
        # Assert
        assert forward <= bound * (1 + 1e-9), (order, forward, bound)
        assert backward <= bound * (1 + 1e-9), (order, backward, bound)


# ---------------------------------------------------------------- epsilon of histories


def test_the_golden_epsilons():
    # Execute
    alone = skellam_epsilon(history=[SK], delta=DELTA)
    mixed = skellam_epsilon(history=[[1.1, 0.05, 40], SK], delta=DELTA)
    # Assert
    assert alone == pytest.approx(GOLDEN_SK, rel=1e-12)
    assert mixed == pytest.approx(GOLDEN_MIXED, rel=1e-12)


def test_the_golden_epsilon_again_from_the_variance_form_of_the_bound():
    # Prepare: the bound written with the variance V = (z D2)^2, as google-research's distributed_dp does, and
    # Zhu-Wang's sum term by term in plain floating point.
    _, z, q, steps, d2, d1 = SK
    variance = (z * d2) ** 2

    def base(a):
        return a * d2**2 / (2 * variance) + min(((2 * a - 1) * d2**2 + 6 * d1) / (4 * variance**2),
                                                3 * d1 / (2 * variance))  # fmt: skip

    def subsampled(a):
        if (a - 1) * base(a) > 700:  # plain floats overflow here: leave the order out (the best order is 6)
            return math.inf
        total = (1 - q) ** (a - 1) * (a * q - q + 1) + math.comb(a, 2) * q**2 * (1 - q) ** (a - 2) * math.exp(base(2))
        total += 3 * sum(math.comb(a, j) * (1 - q) ** (a - j) * q**j * math.exp((j - 1) * base(j))
                         for j in range(3, a + 1))  # fmt: skip
        return min(math.log(total) / (a - 1), base(a))

    orders = list(range(2, 41))  # the best order is 6; past 40 nothing changes
    # Execute
    epsilon = min(steps * subsampled(a) - (math.log(DELTA) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
                  for a in orders)  # fmt: skip
    # Assert
    assert epsilon == pytest.approx(GOLDEN_SK, rel=1e-12)


def test_a_mixed_history_costs_at_least_each_of_its_parts():
    # Prepare
    gaussian = [(1.1, 0.05, 40)]
    accountant = ClientAccountant(gaussian)
    # Execute
    accountant.charge([SK])
    # Assert
    mixed = accountant.epsilon(delta=DELTA)
    assert mixed == pytest.approx(GOLDEN_MIXED, rel=1e-12)
    assert mixed >= ClientAccountant(gaussian).epsilon(delta=DELTA)
    assert mixed >= ClientAccountant([SK]).epsilon(delta=DELTA)
    assert independent_epsilon(history=accountant.history, delta=DELTA) == mixed
    assert accountant.total_steps == 340


def test_a_history_of_triples_is_still_accounted_for_by_opacus_bit_for_bit():
    # Prepare
    history = [(1.1, 0.05, 40), (0.9, 0.01, 700)]
    opacus = RDPAccountant()
    opacus.history = list(history)
    # Execute
    epsilon = ClientAccountant(history).epsilon(delta=DELTA)
    # Assert
    assert epsilon == float(opacus.get_epsilon(delta=DELTA))


def test_the_epsilon_grows_with_every_skellam_step():
    # Prepare
    accountant = ClientAccountant()
    epsilons = []
    # Execute
    for _ in range(4):
        accountant.step_skellam(noise_multiplier=1.0, sample_rate=0.02, steps=50, l2_sensitivity=256,
                                l1_sensitivity=4096)  # fmt: skip
        epsilons.append(accountant.epsilon(delta=DELTA))
    # Assert: one merged entry, and more spent each time.
    assert accountant.history == [("skellam", 1.0, 0.02, 200, 256.0, 4096.0)]
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == 4


@pytest.mark.parametrize("fixed", [(), [(8.0, 1.0, 3)], [["skellam", 2.0, 0.02, 10, 256.0, 4096.0]]])
def test_the_noise_multiplier_lands_on_the_target(fixed):
    # Prepare
    target = 2.0
    args = {"target_epsilon": target, "target_delta": DELTA, "sample_rate": 0.02, "steps": 300,
            "l2_sensitivity": 256, "l1_sensitivity": 4096, "fixed_history": fixed}  # fmt: skip
    # Execute
    z = skellam_noise_multiplier_for(**args)
    # Assert: at most the target, within 1e-3 of it, and the same number on every call (every site).
    reached = skellam_epsilon(history=compose(checked_history(list(fixed)), [("skellam", z, 0.02, 300, 256, 4096)]),
                              delta=DELTA)  # fmt: skip
    assert reached <= target
    assert reached == pytest.approx(target, rel=1e-3)
    assert skellam_noise_multiplier_for(**args) == z


def test_the_noise_multiplier_search_says_when_the_target_is_out_of_reach():
    with pytest.raises(ValueError, match="No Skellam noise multiplier up to 1e"):
        skellam_noise_multiplier_for(target_epsilon=0.5, target_delta=DELTA, sample_rate=0.02, steps=10,
                                     l2_sensitivity=256, l1_sensitivity=4096,
                                     fixed_history=[(0.5, 1.0, 100)])  # fmt: skip


def test_the_gaussian_search_accepts_a_skellam_fixed_history():
    # Execute
    sigma = noise_multiplier_for(target_epsilon=6.0, target_delta=DELTA, sample_rate=0.01, steps=100,
                                 fixed_history=[SK])  # fmt: skip
    # Assert
    epsilon = ClientAccountant([SK, (sigma, 0.01, 100)]).epsilon(delta=DELTA)
    assert 6.0 - 0.01 <= epsilon <= 6.0


# ---------------------------------------------------------------- history entries


def test_skellam_entries_are_checked_and_named_field_by_field():
    # Execute
    checked = checked_history([[1.0, 0.1, 3], SK])
    # Assert
    assert checked == [(1.0, 0.1, 3), ("skellam", 1.0, 0.02, 300, 256.0, 4096.0)]
    with pytest.raises(ValueError, match=r"history\[1\] \(l1_sensitivity\)"):
        checked_history([[1.0, 0.1, 3], ["skellam", 1.0, 0.02, 300, 256.0, 0.0]])
    with pytest.raises(ValueError, match=r"history\[0\] \(steps\)"):
        checked_history([["skellam", 1.0, 0.02, 0, 256.0, 4096.0]])
    with pytest.raises(ValueError, match=r"history\[0\] is a tagged entry"):
        checked_history([["laplace", 1.0, 0.02, 3, 256.0, 4096.0]])
    with pytest.raises(ValueError, match=r"history\[0\] is a tagged entry"):
        checked_history([["skellam", 1.0, 0.02, 3]])


def test_entries_merge_only_with_the_same_kind_and_parameters():
    # Prepare
    sk = skellam_entry(noise_multiplier=1.0, sample_rate=0.02, steps=2, l2_sensitivity=256, l1_sensitivity=4096)
    other_l1 = ("skellam", 1.0, 0.02, 3, 256.0, 1000.0)
    # Execute
    history = compose([(1.0, 0.02, 5)], [sk, list(sk), other_l1, (1.0, 0.02, 1)])
    # Assert
    assert history == [(1.0, 0.02, 5), ("skellam", 1.0, 0.02, 4, 256.0, 4096.0), other_l1, (1.0, 0.02, 1)]
    assert add_steps(history, noise_multiplier=1.0, sample_rate=0.02, steps=2)[-1] == (1.0, 0.02, 3)
    assert history_without(history, [sk, other_l1, (1.0, 0.02, 1)]) == [
        (1.0, 0.02, 5), ("skellam", 1.0, 0.02, 2, 256.0, 4096.0)]  # fmt: skip
    assert history_without(history, [("skellam", 1.0, 0.02, 5, 256.0, 4096.0), other_l1, (1.0, 0.02, 1)]) is None
    assert history_extends(history[:2], history) and not history_extends(history, history[:2])


def test_the_accountant_state_round_trips_skellam_entries_through_json():
    # Prepare
    accountant = ClientAccountant([(1.1, 0.05, 40), SK])
    # Execute
    restored = ClientAccountant.from_state_dict(json.loads(json.dumps(accountant.state_dict())))
    # Assert
    assert accountant.state_dict()["history"] == [[1.1, 0.05, 40], SK]
    assert restored.history == accountant.history
    assert restored.epsilon(delta=DELTA) == accountant.epsilon(delta=DELTA)


# ---------------------------------------------------------------- the ledger and the audit

TRUST = "secure-aggregation; >= 2 of 3 sites in every sum; honest-but-curious coordinator"
VERSIONS = {"fedtower": "0.1.0", "opacus": "1.6.0", "torch": "2.13.0", "flwr": "1.41.0"}


def skellam_rounds(key, rounds=2):
    """Signed, chained entries of one node: a secure round, a DP evaluation, a secure round, ..."""
    accountant, records, previous = ClientAccountant(), [], ""
    own = ["skellam", 1.0, 0.02, 1, 256.0, 4096.0]
    releases = [(own, "trained", "skellam"), ([2.0, 1.0, 1], "evaluated", "gaussian")] * rounds
    for sequence, (added, status, mechanism) in enumerate(releases, start=1):
        before = accountant.epsilon(delta=DELTA)
        accountant.charge([added])
        entry = LedgerEntry(run="run-sk", round=(sequence + 1) // 2, node="node-sk", unit="user",
                            noise_multiplier=added[-5] if status == "trained" else 2.0, sample_rate=0.02,
                            steps=1 if status == "trained" else 0, max_grad_norm=1.0, delta=DELTA, accountant="rdp",
                            epsilon_before=before, epsilon_after=accountant.epsilon(delta=DELTA), status=status,
                            weights="constant", history=accountant.history, versions=VERSIONS,
                            created_at="2025-01-31T12:00:00+00:00", added=[added], mechanism=mechanism,
                            randomness="os-urandom/aes-256-ctr", sequence=sequence, previous=previous,
                            previous_in_run=previous, signer=public_key_text(key.public_key()),
                            trust=TRUST)  # fmt: skip
        record = sign_entry(entry, key)
        previous = record_digest(record)
        records.append(record)
    return records


@pytest.fixture(scope="module")
def key():
    return generate_signing_key()


def test_a_skellam_entry_signs_verifies_and_round_trips_a_config_record(key):
    # Prepare
    record = skellam_rounds(key, rounds=1)[0]
    # Execute
    wire = config_record_from_proto(config_record_to_proto(signed_to_config_record(record)))
    back = signed_from_config_record(wire)
    # Assert
    entry = verify_entry(back, key.public_key())
    assert back == record
    assert entry.history == (("skellam", 1.0, 0.02, 1, 256.0, 4096.0),)
    assert entry.trust == TRUST and entry.mechanism == "skellam"
    assert LedgerEntry.from_dict(json.loads(json.dumps(entry.to_dict()))) == entry


def test_the_trust_field_is_signed(key):
    # Prepare
    record = skellam_rounds(key, rounds=1)[0]
    record["entry"]["trust"] = "no secure aggregation needed"
    # Execute / Assert
    with pytest.raises(ValueError, match="does not match its signature"):
        verify_entry(record, key.public_key())


def test_an_entry_written_before_the_trust_field_still_loads_and_verifies(key):
    # Prepare: an older client's entry dict has no "trust"; it signed those bytes.
    body = skellam_rounds(key, rounds=1)[1]["entry"]  # the Gaussian evaluation entry
    del body["trust"]
    body["mechanism"] = "gaussian"
    old = {**sign_entry(LedgerEntry.from_dict(body), key)}
    # Execute
    wire = config_record_from_proto(config_record_to_proto(signed_to_config_record(old)))
    back = signed_from_config_record(wire)
    # Assert: the same bytes, still verifying, still without the field.
    assert "trust" not in old["entry"] and back == old
    assert verify_entry(back, key.public_key()).trust is None


def test_a_skellam_entry_must_say_what_it_charged_and_whom_it_trusts(key):
    body = skellam_rounds(key, rounds=1)[0]["entry"]
    with pytest.raises(ValueError, match="must state the trust assumptions"):
        LedgerEntry.from_dict(body | {"trust": ""})
    with pytest.raises(ValueError, match="must record its Skellam release in 'added'"):
        LedgerEntry.from_dict(body | {"added": [[1.0, 0.02, 1]], "history": [[1.0, 0.02, 1]]})


def test_the_audit_of_a_skellam_ledger_finds_nothing_and_says_dp_accounting_does_not_apply(key, tmp_path):
    # Prepare
    records = skellam_rounds(key, rounds=2)
    # Execute
    report = audit_records(records, whole_chain=True)
    # Assert
    assert report.findings == []
    assert [row.epsilon_ledger for row in report.rows] == [row.epsilon_fedtower for row in report.rows]
    assert all(math.isnan(row.epsilon_rdp) and math.isnan(row.epsilon_pld) for row in report.rows)
    assert report.rows[-1].epsilon_fedtower > report.rows[0].epsilon_fedtower > 0
    assert "n/a" in epsilon_table_text(report.rows) and "no Skellam mechanism" in report.summary()
    payload = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert payload["rows"][0]["epsilon_rdp"] is None
    assert "| n/a | n/a |" in write_report(report, tmp_path).read_text()
    assert dp_accounting_epsilons([[1.0, 0.02, 3], SK], DELTA) != dp_accounting_epsilons([[1.0, 0.02, 3]], DELTA)


def test_the_audit_still_catches_a_wrong_epsilon_in_a_skellam_entry(key):
    # Prepare: a node that under-reports what its Skellam round cost, and re-signs.
    records = skellam_rounds(key, rounds=1)
    body = dict(records[0]["entry"])
    body["epsilon_after"] = body["epsilon_after"] / 2
    records[0] = sign_entry(LedgerEntry.from_dict(body), key)
    # Execute
    problems = [finding.problem for finding in audit_records(records[:1]).findings]
    # Assert
    assert any("epsilon_after" in problem and "independent RDP accountant" in problem for problem in problems)


def test_the_monitor_refuses_a_skellam_history_that_went_back(key):
    # Prepare
    first, _, second, _ = (LedgerEntry.from_dict(r["entry"]) for r in skellam_rounds(key, rounds=2))
    monitor = LedgerMonitor()
    monitor.accept(7, second)
    monitor = LedgerMonitor(json.loads(json.dumps(monitor.state_dict())))
    # Execute / Assert: the first round again, after the second, is a reset.
    assert monitor.problem(7, first) is not None
    fresh = LedgerMonitor()
    fresh.accept(7, first)
    assert fresh.problem(7, second) is None


# ---------------------------------------------------------------- the sampler


def chi_square_p_value(draws: np.ndarray, distribution, low: int, high: int) -> float:
    """Pearson's test over the cells low..high plus both tails, cells with fewer than 5 expected merged."""
    ks = np.arange(low, high + 1)
    observed = np.concatenate([[np.sum(draws < low)], np.bincount(draws[(draws >= low) & (draws <= high)] - low,
                                                                  minlength=len(ks)), [np.sum(draws > high)]])
    expected = np.concatenate([[distribution.cdf(low - 1)], distribution.pmf(ks), [distribution.sf(high)]])
    expected = expected * len(draws)
    big = expected >= 5
    observed = np.append(observed[big], observed[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    statistic = float(np.sum((observed - expected) ** 2 / np.maximum(expected, 1e-300)))
    return float(stats.chi2.sf(statistic, len(observed) - 1))  # fmt: skip


@pytest.mark.parametrize("mu", [1.5, 40.0, 1e4])
def test_skellam_noise_has_the_skellam_distribution(mu):
    # Prepare
    randomness = DPRandom.test_only_seeded(11)
    sd = math.sqrt(2 * mu)
    # Execute
    draws = skellam_noise(randomness, mu=mu, size=400_000)
    # Assert
    assert draws.dtype == np.int64 and draws.shape == (400_000,)
    assert abs(draws.mean()) < 5 * sd / math.sqrt(len(draws))
    assert draws.var() == pytest.approx(2 * mu, rel=0.02)
    assert chi_square_p_value(draws, stats.skellam(mu, mu), int(-5 * sd) - 1, int(5 * sd) + 1) > 1e-3


@pytest.mark.parametrize("mu", [0.2, 9.99, 10.0, 12.5, 1e6])
def test_the_poisson_draws_have_the_poisson_distribution(mu):
    # Prepare: either side of the switch from inversion to PTRS at 10.
    randomness = DPRandom.test_only_seeded(5)
    # Execute
    draws = secure_poisson(randomness, mu=mu, size=300_000)
    # Assert
    sd = math.sqrt(mu)
    assert draws.min() >= 0
    assert chi_square_p_value(draws, stats.poisson(mu), max(0, int(mu - 5 * sd)), int(mu + 5 * sd) + 2) > 1e-3


def test_two_secure_generators_draw_differently_and_a_seed_reproduces():
    # Execute
    first, second = (skellam_noise(DPRandom(), mu=1e3, size=1000) for _ in range(2))
    seeded = [skellam_noise(DPRandom.test_only_seeded(3), mu=1e3, size=1000) for _ in range(2)]
    # Assert
    assert not np.array_equal(first, second)
    assert np.array_equal(seeded[0], seeded[1])
    assert not np.array_equal(seeded[0], skellam_noise(DPRandom.test_only_seeded(4), mu=1e3, size=1000))


def test_a_large_noise_vector_is_fast():
    # Prepare: an item tower of 3.2 million coordinates, a noise share of mu = 1e6.
    randomness = DPRandom()
    # Execute
    start = time.perf_counter()
    draws = skellam_noise(randomness, mu=1e6, size=3_200_000)
    elapsed = time.perf_counter() - start
    # Assert (about 0.6 s on one core; generous for a loaded machine)
    assert draws.shape == (3_200_000,)
    assert draws.var() == pytest.approx(2e6, rel=0.01)
    assert elapsed < 15.0


@pytest.mark.parametrize("mu, size, message", [(0.0, 3, "mu"), (-1.0, 3, "mu"), (math.nan, 3, "mu"),
                                               (2.0**60, 3, "mu"), (True, 3, "mu"), (1.0, -1, "size"),
                                               (1.0, 2.0, "size")])  # fmt: skip
def test_bad_noise_parameters_are_refused(mu, size, message):
    with pytest.raises(ValueError, match=message):
        skellam_noise(DPRandom.test_only_seeded(1), mu=mu, size=size)


def test_the_sampler_takes_only_the_secure_source():
    with pytest.raises(ValueError, match="DPRandom"):
        skellam_noise(np.random.default_rng(0), mu=1.0, size=3)
    assert skellam_noise(DPRandom.test_only_seeded(1), mu=1.0, size=0).shape == (0,)
