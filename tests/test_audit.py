"""The auditor's journey: signed and chained ledgers, `fedtower audit`, and the empirical audit.

The ledgers here are real: written by the client's own train and evaluate handlers over
several rounds of two sites, then tampered with as someone who holds the file could.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedtower.cli import app
from fedtower.client.handlers import evaluate_on_node, train_on_node
from fedtower.client.state import ClientStateStore
from fedtower.config import RunSettings
from fedtower.deployment.keys import create_ledger_keys
from fedtower.privacy.audit import KeyRegistry, audit_records, dp_accounting_epsilons, read_ledger_file
from fedtower.privacy.empirical_audit import add_canaries, audit_p_value, epsilon_lower_bound, guess_and_bound
from fedtower.privacy.ledger import ServerLedger, entry_of, ledger_line_of, record_digest, sign_entry
from fedtower.server.federation import initial_item_tower
from tests.flower_utils import node_context, server_message, task_identity

DATA = "synthetic:users=90,items=120,seed=4"
runner = CliRunner()


def run_config(out, **over):
    base = RunSettings(data=DATA, num_sites=3, dim=16, local_epochs=1, output_dir=str(out), run_name="audited",
                       history_len=30, dp_batch_size=8, num_negatives=16, noise_multiplier=1.0)  # fmt: skip
    return {**base.to_run_config(), **over}


def site(tmp_path, partition, **extra):
    state = tmp_path / f"state-{partition}"
    state.mkdir(mode=0o700)
    return {"partition-id": partition, "num-partitions": 3, "state-dir": str(state), "dp-population-users": 30,
            "allow-plaintext-state": True, **extra}  # fmt: skip


def federation(tmp_path, rounds=3, sites=None, config=None):
    """Rounds of train (and an evaluation at the end) at each site, the replies kept as a server would."""
    config = config or run_config(tmp_path)
    sites = sites or [site(tmp_path, 0), site(tmp_path, 1)]
    tower = initial_item_tower(RunSettings.from_run_config(config))
    ledger = ServerLedger(tmp_path / "run" / "privacy_ledger.jsonl")
    for server_round in range(1, rounds + 1):
        for node_id, node in enumerate(sites, start=3):
            with task_identity(node_id=node_id):
                message = server_message(tower, node_id=node_id, server_round=server_round, run_name="audited")
                reply = train_on_node(message, node_context(node, config, node_id=node_id))
            ledger.append(ledger_line_of(reply.content["ledger"]))
    for node_id, node in enumerate(sites, start=3):
        with task_identity(node_id=node_id):
            message = server_message(tower, node_id=node_id, message_type="evaluate", server_round=rounds,
                                     run_name="audited")  # fmt: skip
            reply = evaluate_on_node(message, node_context(node, config, node_id=node_id))
        ledger.append(ledger_line_of(reply.content["ledger"]))
    return ledger, sites


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    root = tmp_path_factory.mktemp("honest")
    ledger, sites = federation(root)
    return root, ledger, sites


def problems(records, **kw):
    return [f.problem for f in audit_records(records, **kw).findings]


# ------------------------------------------------------------------ signed, chained entries


def test_an_honest_ledger_verifies_and_every_epsilon_agrees_with_dp_accounting(honest):
    _, ledger, _ = honest
    records = ledger.entries()
    report = audit_records(records)
    assert report.ok, report.summary()
    assert len(records) == 8 and all("signature" in r for r in records)
    for row in report.rows:  # three independent computations side by side
        assert row.epsilon_ledger == pytest.approx(row.epsilon_rdp, rel=0.01)
        assert row.epsilon_ledger == pytest.approx(row.epsilon_fedtower, rel=1e-6)
        assert row.epsilon_pld < row.epsilon_rdp  # PLD is the tighter bound
    # Each node's run chain: round r names round r-1's record.
    by_node = {}
    for record in records:
        by_node.setdefault(entry_of(record).node, []).append(record)
    for chain in by_node.values():
        assert entry_of(chain[0]).previous_in_run == ""
        for before, after in zip(chain, chain[1:]):
            assert entry_of(after).previous_in_run == record_digest(before)


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        ("value", "does not match its signature"),
        ("delete", "does not follow this node's previous entry"),
        ("reorder", "does not follow this node's previous entry"),
        ("replay", "is a replay of line"),
        ("swap-key", "signing key changed"),
        ("unsigned", "not signed"),
    ],
)
def test_every_kind_of_tampering_is_found(honest, tamper, expected):
    _, ledger, _ = honest
    records = copy.deepcopy(ledger.entries())
    if tamper == "value":  # the f7 forgery: claim a smaller epsilon
        records[4]["entry"]["epsilon_after"] = 0.43
    elif tamper == "delete":
        del records[2]
    elif tamper == "reorder":
        records[2], records[4] = records[4], records[2]
    elif tamper == "replay":
        records.append(copy.deepcopy(records[0]))
    elif tamper == "swap-key":  # a node's entry re-signed by another key
        from fedtower.privacy.ledger import LedgerEntry, generate_signing_key, public_key_text

        key = generate_signing_key()
        entry = LedgerEntry.from_dict({**records[4]["entry"], "signer": public_key_text(key.public_key())})
        records[4] = sign_entry(entry, key)
    elif tamper == "unsigned":
        records[3] = records[3]["entry"]
    found = problems(records)
    assert any(expected in p for p in found), found


def test_registered_keys_name_the_site_and_refuse_strangers(tmp_path):
    # Prepare: site 0 signs with a key from `fedtower keys node`, registered; site 1 keeps its own.
    keys = tmp_path / "keys"
    key, pub = create_ledger_keys(keys, site="site-a")
    ledger, _ = federation(tmp_path, rounds=2, sites=[site(tmp_path, 0, **{"ledger-key": str(key)}),
                                                      site(tmp_path, 1)])  # fmt: skip
    registry = KeyRegistry.from_dir(keys)
    # Execute
    report = audit_records(ledger.entries(), registry=registry)
    # Assert: site-a's lines verify against its registered key; the other node's key is unknown.
    assert {row.site for row in report.rows} == {"site-a", None}
    assert all("not registered" in f.problem for f in report.findings) and report.findings
    # A rotation: a second registered key of the same site signs later lines; the chain carries on.
    key2, _ = create_ledger_keys(keys / "rotated", site="site-a")
    shutil.copy(keys / "rotated" / "site-a.ledger.pub", keys / "site-a.2.pub")
    (tmp_path / "r").mkdir()
    more, _ = federation(tmp_path / "r", rounds=1, sites=[site(tmp_path / "r", 0, **{"ledger-key": str(key2)})])
    rotated = audit_records(more.entries(), registry=KeyRegistry.from_dir(keys))
    assert rotated.ok and all(row.site == "site-a" for row in rotated.rows)


def test_released_raw_evaluation_and_test_only_hooks_are_findings(tmp_path):
    sites = [site(tmp_path, 0, **{"allow-raw-evaluation": True}), site(tmp_path, 1, **{"test-only-noise-scale": 0.1})]
    ledger, _ = federation(tmp_path, rounds=1, sites=sites)
    found = problems(ledger.entries())
    assert any("exact evaluation sums were released" in p for p in found)
    assert any("test-only hook was active (noise-scale=0.1)" in p for p in found)


def test_a_sites_own_ledger_must_match_the_servers(honest):
    root, ledger, sites = honest
    local = ClientStateStore(sites[0]["state-dir"]).read_ledger()
    assert audit_records(ledger.entries(), site_ledgers={"site-0": local}).ok
    # The server lost one of the site's lines: the site's own ledger shows it.
    records = ledger.entries()
    missing = [r for r in records if record_digest(r) != record_digest(local[1])]
    found = [f.problem for f in audit_records(missing, site_ledgers={"site-0": local}).findings]
    assert any("the server's ledger lacks it" in p for p in found)


def test_a_sites_whole_chain_is_checked_by_site_ledger_verify(honest, tmp_path):
    _, _, sites = honest
    state = Path(sites[1]["state-dir"])
    result = runner.invoke(app, ["site", "ledger", "--state-dir", str(state), "--verify"])
    assert result.exit_code == 0, result.output
    assert "No problems found" in result.output
    key = runner.invoke(app, ["site", "ledger", "--state-dir", str(state), "--public-key"])
    assert key.exit_code == 0 and entry_of(ClientStateStore(state).read_ledger()[0]).signer == key.output.strip()
    # The node's own chain, with a line removed from the middle (as a rollback of the log would).
    local = ClientStateStore(state).read_ledger()
    assert any("breaks the node's own chain" in f.problem
               for f in audit_records(local[:1] + local[2:], whole_chain=True).findings)  # fmt: skip


# ------------------------------------------------------------------ dp-accounting and the CLI


def test_dp_accounting_agrees_on_golden_values():
    # The privacy findings' golden values (f5): Opacus RDP 4.663461 for 12 steps at sigma 1, q 4/15.
    rdp, pld = dp_accounting_epsilons([[1.0, 0.26666666666666666, 12]], 1 / 300)
    assert rdp == pytest.approx(4.679767, rel=1e-5)
    assert pld == pytest.approx(3.752325, rel=1e-2)
    # A Gaussian mechanism (q = 1): both accountants, a DP evaluation as the ledger charges it.
    rdp1, pld1 = dp_accounting_epsilons([[20.0, 1.0, 1]], 1e-5)
    assert 0 < pld1 < rdp1 < 0.3


def test_the_audit_command_exits_by_its_findings_and_writes_json_and_a_report(honest, tmp_path):
    root, ledger, _ = honest
    ok = runner.invoke(app, ["audit", str(ledger.path), "--json", "--report", str(tmp_path / "report")])
    assert ok.exit_code == 0, ok.output
    body = json.loads(ok.output)
    assert body["ok"] and body["entries"] == 8 and len(body["final"]) == 2
    assert (tmp_path / "report" / "audit.md").read_text().count("| node-") == 8
    assert (tmp_path / "report" / "epsilon.png").stat().st_size > 1000
    forged = tmp_path / "forged.jsonl"
    records = ledger.entries()
    records[0]["entry"]["epsilon_after"] = 0.01
    forged.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    bad = runner.invoke(app, ["audit", str(forged)])
    assert bad.exit_code == 1 and "problem(s)" in bad.output
    missing = runner.invoke(app, ["audit", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "No privacy ledger" in missing.output
    assert read_ledger_file(ledger.path.parent)[0] == ledger.path


# ------------------------------------------------------------------ the empirical audit


def test_the_one_run_bound_matches_hand_computed_cases():
    # All 100 guesses right, no delta: P[Bin(100, q) = 100] = q^100 = 0.05 at q = 0.05^(1/100).
    q = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(1000, 100, 100, delta=0.0) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)
    # Half right is what a coin gives: no bound at all.
    assert epsilon_lower_bound(1000, 100, 50, delta=1e-6) == 0.0
    # The p-value is monotone in epsilon and delta only adds to it.
    assert audit_p_value(500, 100, 80, 1.0, 1e-5) >= audit_p_value(500, 100, 80, 1.0, 0.0)
    assert audit_p_value(500, 100, 80, 2.0, 0.0) > audit_p_value(500, 100, 80, 1.0, 0.0)


def test_perfectly_separated_scores_give_the_largest_bound_and_shuffled_ones_none():
    import numpy as np

    included = np.array([True, False] * 100)
    assert guess_and_bound(included.astype(float), included, k=50, delta=1e-6).correct == 100
    rng = np.random.default_rng(0)
    assert guess_and_bound(rng.normal(size=200), included, k=50, delta=1e-6).lower_bound < 1.0


def test_canaries_are_one_privacy_unit_each():
    from fedtower.data.prepared import prepare_split
    from fedtower.data.synthetic import SyntheticConfig, generate

    base = generate(SyntheticConfig(num_users=40, num_items=30, seed=1))
    for unit in ("user", "interaction"):
        canaries = add_canaries(base, 20, unit)
        split = prepare_split(canaries.dataset)
        users = [u for u in split.users if u.startswith("canary")]
        rows = canaries.dataset.catalogue.index.rows(canaries.items)
        trained = {int(i) for u in users for i in split.train.items_of(split.users.index(u))}
        # The canary item of a canary that is in is in training (never held out); an out one nowhere.
        assert {int(rows[c]) for c in range(20) if canaries.included[c]} <= trained
        assert not {int(rows[c]) for c in range(20) if not canaries.included[c]} & trained
        expected_users = int(canaries.included.sum()) if unit == "user" else 20
        assert len(users) == expected_users


@pytest.mark.slow
def test_the_empirical_audit_passes_an_honest_run_and_catches_broken_ones(tmp_path):
    from fedtower.simulations.audit_run import AuditConfig, run_audit

    for epsilon in (1.0, 4.0, 8.0):
        honest_run = run_audit(AuditConfig(unit="user", target_epsilon=epsilon), tmp_path / f"honest-{epsilon:g}")
        assert honest_run.lower_bound <= honest_run.claimed_epsilon <= epsilon * (1 + 1e-6), honest_run.to_dict()
        assert honest_run.hooks == []
    noisy = run_audit(AuditConfig(unit="user", target_epsilon=1.0, noise_scale=0.1), tmp_path / "noise")
    unclipped = run_audit(AuditConfig(unit="interaction", target_epsilon=1.0, no_clipping=True), tmp_path / "clip")
    for broken in (noisy, unclipped):
        assert broken.lower_bound > broken.claimed_epsilon, broken.to_dict()
        assert broken.hooks  # and the ledger says so
