"""Secure aggregation with federation-wide DP, end to end: in process, and on Flower's simulation engine.

In process (`InProcessGrid`): the real ServerApp logic and ClientApp handlers, with what every site
put under its masks recorded (by wrapping `SecAggSite.masked_input`, which still runs) so the
coordinator's sum can be checked against them, and every message the coordinator received kept.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtower.config import RunSettings
from fedtower.privacy.ledger import LedgerEntry
from fedtower.secure_aggregation import protocol
from fedtower.secure_aggregation.protocol import decode_signed
from fedtower.simulations.in_process import simulate_in_process
from fedtower.strategies.secure_dp import SecureDPStep

DATA = "synthetic:users=150,items=120,seed=4"
SITES = {"allow-plaintext-state": True}


def secure_config(tmp_path, name: str, **overrides) -> RunSettings:
    return RunSettings.from_run_config({
        "data": DATA, "num-sites": 3, "dim": 8, "history-len": 30, "num-negatives": 16, "num-server-rounds": 2,
        "eval-every": 2, "secure-aggregation": True, "noise-multiplier": 1.0, "dp-federation-users": 150,
        "dp-batch-size": 30, "secagg-scale": 1024, "output-dir": str(tmp_path), "run-name": name,
        **overrides})  # fmt: skip


@pytest.fixture
def recorded(monkeypatch):
    """What each site put under its masks, and each sum the coordinator unmasked (both still computed)."""
    seen = {"inputs": [], "totals": []}
    masked_input, step = protocol.SecAggSite.masked_input, SecureDPStep._step

    def record_input(self, vector, *args, **kwargs):
        seen["inputs"].append((self.node_id, np.array(vector, copy=True)))
        return masked_input(self, vector, *args, **kwargs)

    def record_total(self, arrays, total):
        seen["totals"].append(np.array(total, copy=True))
        return step(self, arrays, total)

    monkeypatch.setattr(protocol.SecAggSite, "masked_input", record_input)
    monkeypatch.setattr(SecureDPStep, "_step", record_total)
    return seen


def stages_sent(grid) -> list[str]:
    return [str(m.content["config"].get("secagg-stage", "")) for m in grid.delivered if "config" in m.content]


def inputs_by_round(seen, sites: int) -> list[list[tuple[int, np.ndarray]]]:
    inputs = seen["inputs"]
    return [inputs[i : i + sites] for i in range(0, len(inputs), sites)]


def test_the_coordinator_learns_exactly_the_sum_of_the_sites_inputs_and_nothing_of_one(tmp_path, recorded):
    # Prepare
    settings = secure_config(tmp_path, "sum")
    # Execute
    result, grid = simulate_in_process(settings, site_config=SITES)
    # Assert: two rounds, each unmasked sum is exactly the sum of the three sites' integer inputs.
    assert len(recorded["totals"]) == 2
    for round_inputs, total in zip(inputs_by_round(recorded, 3), recorded["totals"], strict=True):
        assert len(round_inputs) == 3
        expected = sum(decode_signed(vector).astype(np.int64) for _, vector in round_inputs)
        np.testing.assert_array_equal(total, expected)
    # No message the coordinator received holds one site's input, or anything correlated with it.
    inputs = [vector for _, vector in recorded["inputs"]]
    arrays = [a.numpy() for m in grid.received if not m.has_error() and "arrays" in m.content
              for a in m.content["arrays"].values()]  # fmt: skip
    assert len(arrays) == 6  # the masked inputs, nothing else
    for vector in inputs:
        signed = decode_signed(vector).astype(np.float64)
        for received in arrays:
            assert not np.array_equal(received, vector)
            corr = np.corrcoef(received.astype(np.float64), signed)[0, 1]
            assert abs(corr) < 0.1
    # ... nor any file the coordinator wrote (a masked or unmasked site input would show its raw bytes).
    needles = [vector[:16].tobytes() for vector in inputs]
    for path in (tmp_path / "sum").rglob("*"):
        if path.is_file() and "clients" not in path.parts:
            blob = path.read_bytes()
            assert not any(needle in blob for needle in needles), path
    # Every site charged the federation-wide mechanism, with its trust assumptions, in a signed entry.
    entries = [LedgerEntry.from_dict(e) for e in result["ledger"]]
    assert {e.mechanism for e in entries if e.status == "trained"} == {"skellam"}
    assert all(">= 2 of 3 sites" in e.trust for e in entries if e.status == "trained")
    last = [e for e in entries if e.status == "trained"][-1]
    assert [h[0] for h in last.history if isinstance(h[0], str)] == ["skellam"]
    summary = (tmp_path / "sum" / "summary.txt").read_text()
    assert "secure aggregation" in summary and "threshold t = 2" in summary and "Noise share" in summary


def test_a_site_that_drops_after_masking_leaves_a_correct_round(tmp_path, recorded):
    # Prepare: site 2 sends its masked input, then vanishes before unmasking (t = 2 of 3).
    settings = secure_config(tmp_path, "late-drop", **{"num-server-rounds": 1, "eval-every": 1})
    # Execute
    result, grid = simulate_in_process(settings, site_config=SITES, per_site={2: {"test-only-secagg-drop": 4}})
    # Assert: its input is still in the sum (its masks are removed with the survivors' shares).
    (total,) = recorded["totals"]
    assert len(recorded["inputs"]) == 3
    np.testing.assert_array_equal(total, sum(decode_signed(v).astype(np.int64) for _, v in recorded["inputs"]))
    assert stages_sent(grid).count("unmask") == 3


def test_a_site_that_drops_before_masking_is_left_out_of_the_sum(tmp_path, recorded):
    settings = secure_config(tmp_path, "early-drop", **{"num-server-rounds": 1, "eval-every": 1})
    result, grid = simulate_in_process(settings, site_config=SITES, per_site={0: {"test-only-secagg-drop": 3}})
    (total,) = recorded["totals"]
    assert len(recorded["inputs"]) == 2  # site 0 never masked anything
    np.testing.assert_array_equal(total, sum(decode_signed(v).astype(np.int64) for _, v in recorded["inputs"]))
    assert stages_sent(grid).count("unmask") == 2  # only the survivors are asked


def test_one_dropout_more_than_allowed_aborts_the_round_before_anything_is_unmasked(tmp_path, recorded):
    # Prepare: two of three sites vanish before masking; t = 2.
    settings = secure_config(tmp_path, "abort", **{"num-server-rounds": 1, "eval-every": 1})
    drop = {"test-only-secagg-drop": 3}
    # Execute
    result, grid = simulate_in_process(settings, site_config=SITES, per_site={0: drop, 1: drop})
    # Assert: no unmask request left the coordinator, no sum exists, the tower stayed as it was.
    assert "unmask" not in stages_sent(grid)
    assert recorded["totals"] == []
    summary = (tmp_path / "abort" / "summary.txt").read_text()
    assert "1 round(s) aborted" in summary


def test_the_accountant_charges_the_federation_wide_mechanism(tmp_path, recorded):
    from fedtower.privacy.skellam import skellam_epsilon

    settings = secure_config(tmp_path, "account")
    result, _ = simulate_in_process(settings, site_config=SITES)
    trained = [LedgerEntry.from_dict(e) for e in result["ledger"] if e["status"] == "trained"]
    final = trained[-1]
    # q over the whole federation, one step per round, D2 = secagg-scale, D1 = min(D2^2, sqrt(d) D2).
    kind, z, q, steps, l2, l1 = final.history[-1]
    assert (kind, z, q, steps, l2) == ("skellam", 1.0, 30 / 150, 2, 1024)
    assert l1 <= 1024**2
    recomputed = skellam_epsilon(history=[list(h) for h in final.history], delta=final.delta)
    assert math.isclose(final.epsilon_after, recomputed, rel_tol=1e-9)


def test_every_site_adds_a_share_of_the_same_noise_whatever_its_own_settings(tmp_path):
    # Prepare: a target epsilon (so z is planned), and sites whose own settings would change a per-site plan:
    # site 0 releases exact evaluation sums (no DP evaluations to plan for), site 1 has a smaller max-delta.
    settings = secure_config(tmp_path, "same-z", **{"noise-multiplier": 0.0, "target-epsilon": 4.0})
    per_site = {0: {"allow-raw-evaluation": True}, 1: {"max-delta": 1e-4}}
    # Execute
    result, _ = simulate_in_process(settings, site_config=SITES, per_site=per_site)
    # Assert: one z everywhere (the t shares sum to the noise every site charges), each site at its own delta.
    entries = [LedgerEntry.from_dict(e) for e in result["ledger"]]
    trained = [e for e in entries if e.status == "trained"]
    assert len({e.noise_multiplier for e in trained}) == 1
    assert {e.delta for e in trained} == {1e-4, 1 / (10 * 150)}
    # The stricter site's epsilon at its own delta is higher: it stops before passing the run's target.
    strict = [e for e in entries if e.delta == 1e-4]
    assert [(e.round, e.status) for e in strict] == [(1, "trained"), (2, "budget-exhausted"), (2, "evaluated")]
    assert max(e.epsilon_after for e in entries) <= 4.0


def test_a_site_refuses_rounds_below_its_own_limits(tmp_path):
    # A site that requires secure aggregation refuses a per-site DP run; one whose minimum t is above the
    # round's refuses the secure round: no ledger entry, no update from it.
    plain = RunSettings.from_run_config({"data": DATA, "num-sites": 3, "dim": 8, "history-len": 30,
                                         "num-server-rounds": 1, "noise-multiplier": 1.0,
                                         "output-dir": str(tmp_path), "run-name": "plain"})  # fmt: skip
    result, grid = simulate_in_process(plain, site_config={**SITES, "dp-population-users": 50},
                                       per_site={0: {"require-secure-aggregation": True}})  # fmt: skip
    errors = [m.error.reason for m in grid.received if m.has_error()]
    assert any("requires secure aggregation" in e for e in errors)
    secure = secure_config(tmp_path, "min-t", **{"num-server-rounds": 1, "eval-every": 1})
    result, grid = simulate_in_process(secure, site_config=SITES, per_site={1: {"min-secagg-threshold": 3}})
    errors = [m.error.reason for m in grid.received if m.has_error()]
    assert any("min-secagg-threshold = 3" in e for e in errors)


# ---------------------------------------------------------------- on Flower's simulation engine (Ray)


@pytest.mark.simulation
def test_a_ray_simulation_sums_exactly_what_the_surviving_sites_masked(tmp_path):
    from fedtower.simulations.runner import simulate
    from tests.secagg_utils import (
        files_holding,
        independent_secure_epsilon,
        item_tower,
        raw_byte_needles,
        recorded_inputs,
        table_slices,
        unmasked_table_sum,  # fmt: skip
    )

    # Prepare: four sites, t = 3; site 3 vanishes at the masked-input stage of every round.
    # One Ray actor per site (client-num-cpus 0.5 on 2 cores): a site that exits its process must take no
    # other site's queued message down with its actor.
    settings = secure_config(tmp_path, "ray", **{"num-sites": 4, "secagg-threshold": 3, "dp-federation-users": 150,
                                                 "eval-every": 2, "client-num-cpus": 0.5})  # fmt: skip
    record = {**SITES, "test-only-secagg-record": True}
    # Execute
    result = simulate(settings, site_config=record, per_site={3: {"test-only-secagg-drop": 3}})
    # Assert: both rounds stepped; each round's unmasked sum, read back from the released towers, is exactly
    # the sum of what the three survivors put under their masks (the dropped site's masks cancelled).
    run_path = tmp_path / "ray"
    states = [settings.node_state_dir(p) for p in range(4)]
    assert recorded_inputs(states[3], 1) is None and recorded_inputs(states[3], 2) is None
    for server_round in (1, 2):
        before, after = item_tower(run_path, settings, server_round - 1), item_tower(run_path, settings, server_round)
        recovered = unmasked_table_sum(before, after, settings)
        inputs = [recorded_inputs(states[p], server_round) for p in range(3)]
        expected = table_slices(sum(v.astype(np.int64) for v in inputs), before)
        for key, total in expected.items():
            np.testing.assert_allclose(recovered[key], total, atol=0.05, rtol=0)
        assert any(np.abs(v).max() > 0 for v in expected.values())
    # Nothing the coordinator stored holds one site's input.
    needles = [n for p in range(3) for r in (1, 2) for n in raw_byte_needles(recorded_inputs(states[p], r))]
    assert files_holding(run_path, needles) == []
    # Each survivor charged two federation-wide Skellam steps, which an independent recomputation matches.
    trained = [LedgerEntry.from_dict(e) for e in result["ledger"] if e["status"] == "trained"]
    assert len(trained) == 6 and {e.mechanism for e in trained} == {"skellam"}
    for entry in trained:
        skellam = [h for h in entry.history if isinstance(h[0], str)]
        assert len(skellam) == 1 and skellam[0][3] == entry.round
        recomputed = independent_secure_epsilon([list(h) for h in entry.history], entry.delta)
        assert math.isclose(entry.epsilon_after, recomputed, rel_tol=1e-9)
        assert ">= 3 of 4 sites" in entry.trust
    summary = (run_path / "summary.txt").read_text()
    assert "threshold t = 3" in summary and "0 round(s) aborted" in summary


@pytest.mark.simulation
def test_a_ray_simulation_aborts_a_round_that_loses_one_site_too_many(tmp_path):
    from fedtower.simulations.runner import simulate
    from tests.secagg_utils import item_tower

    # Prepare: four sites, t = 3, two vanish at the masked-input stage.
    # One Ray actor per site, as above: the two vanishing sites must not take the survivors' messages with them.
    settings = secure_config(tmp_path, "ray-abort", **{"num-sites": 4, "secagg-threshold": 3, "num-server-rounds": 1,
                                                       "eval-every": 1, "client-num-cpus": 0.5})  # fmt: skip
    drop = {"test-only-secagg-drop": 3}
    # Execute
    result = simulate(settings, site_config=SITES, per_site={2: drop, 3: drop})
    # Assert: nothing was unmasked, so the released tower is the initial one. The two sites that sent a masked
    # input charged its step anyway (once it left them they cannot know it will never be unmasked); the two
    # that vanished charged nothing.
    charged = sorted(LedgerEntry.from_dict(e).round for e in result["ledger"] if e["status"] == "trained")
    assert charged == [1, 1]
    run_path = tmp_path / "ray-abort"
    before, after = item_tower(run_path, settings, 0), item_tower(run_path, settings, 1)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    summary = (run_path / "summary.txt").read_text()
    assert "1 round(s) aborted" in summary and "fewer than the threshold" in summary


def test_a_coordinator_that_knows_the_run_config_and_seed_cannot_reproduce_a_sites_input(tmp_path, recorded):
    # Prepare: the coordinator's view: the same run config and seed, run twice (it can rerun anything offline).
    first = secure_config(tmp_path / "a", "same", **{"num-server-rounds": 1, "eval-every": 1})
    second = secure_config(tmp_path / "b", "same", **{"num-server-rounds": 1, "eval-every": 1})
    # Execute
    simulate_in_process(first, site_config=SITES)
    simulate_in_process(second, site_config=SITES)
    # Assert: every site's pre-mask input (its users' quantized sum plus its noise share) differs between the
    # two runs by about its noise share: the sampling, rounding and noise come from the OS, not the config.
    inputs = [decode_signed(v).astype(np.float64) for _, v in recorded["inputs"]]
    assert len(inputs) == 6
    share_std = math.sqrt(2 * (1.0 * 1024) ** 2 / (2 * 2))  # z D2 / sqrt(t): this run's noise share
    for a, b in zip(inputs[:3], inputs[3:], strict=True):
        difference = a - b
        assert not np.array_equal(a, b)
        assert 0.9 * math.sqrt(2) * share_std < difference.std() < 1.5 * math.sqrt(2) * share_std
    # ... and so do the sums it unmasks.
    first_total, second_total = recorded["totals"]
    assert not np.array_equal(first_total, second_total)
