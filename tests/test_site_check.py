"""`fedtower site check`: a partner site's readiness, its budget, and exactly what it shares."""

import hashlib
import json

import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from typer.testing import CliRunner

from fedtower.cli import app
from fedtower.client.handlers import evaluate_on_node, train_on_node
from fedtower.client.state import ClientStateStore
from fedtower.client.state_crypto import ENV_KEY, ENV_KEY_FILE, write_new_key_file
from fedtower.config import RunSettings
from fedtower.data.schema import EVENT_COLUMNS
from fedtower.data.sources import resolve_dataset
from fedtower.deployment.site_check import PROBLEM, WARNING, check_site
from fedtower.privacy.ledger import LedgerEntry, entry_of
from fedtower.server.federation import initial_item_tower
from tests.flower_utils import node_context, server_message, task_identity

DATA = "synthetic:users=90,items=120,seed=4"
DP_RUN = {"data": DATA, "dim": 16, "noise-multiplier": 1.5}
runner = CliRunner()


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch):
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)


def make_site(root, *, users: int = 30):
    """A site folder (events.csv of some users of DATA), an empty state dir (700) and a state key."""
    dataset, _ = resolve_dataset(DATA)
    keep = sorted(dataset.events["user"].unique())[:users]
    events = dataset.events[dataset.events["user"].isin(keep)][list(EVENT_COLUMNS)]
    (root / "data").mkdir(parents=True)
    events.to_csv(root / "data" / "events.csv", index=False)
    (root / "state").mkdir(mode=0o700)
    write_new_key_file(root / "state.key")
    return root / "data" / "events.csv", root / "state", root / "state.key", len(events)


def run_config(**overrides):
    settings = RunSettings(data=DATA, dim=16, local_epochs=1, run_name="deploy", history_len=30,
                           dp_batch_size=8, num_negatives=16)  # fmt: skip
    return {**settings.to_run_config(), **overrides}


def node_config(data, state, key, **extra):
    return {"data-path": str(data), "state-dir": str(state), "state-key-file": str(key), **extra}


def one_round(config, nodes, message_type="train"):
    tower = initial_item_tower(RunSettings.from_run_config(config))
    handler = train_on_node if message_type == "train" else evaluate_on_node
    with task_identity():
        return handler(server_message(tower, node_id=3, message_type=message_type), node_context(nodes, config))


def dir_digest(path) -> str:
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(path.iterdir()))).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A site after one real private round (max-epsilon 8): its paths and the reply it sent."""
    data, state, key, _ = make_site(tmp_path_factory.mktemp("trained"))
    nodes = node_config(data, state, key, **{"max-epsilon": 8.0})
    reply = one_round(run_config(**{"noise-multiplier": 1.5}), nodes)
    return data, state, key, reply


def statuses(report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def test_a_fresh_site_with_good_data_and_an_encrypted_state_is_ready(tmp_path):
    # Prepare
    data, state, key, rows = make_site(tmp_path)
    # Execute
    report = check_site(data, state, max_epsilon=8.0, state_key_file=key, run_config=DP_RUN)
    # Assert
    assert report.ready, report.problems
    assert statuses(report) == {"state dir": "ok", "state": "ok", "privacy budget": "ok", "data": "ok",
                                "evaluation": "ok", "population": "warning", "rollback counter": "ok"}  # fmt: skip
    assert "releases a DP count" in next(c.detail for c in report.checks if c.name == "population")
    assert "temporal" in next(c.detail for c in report.checks if c.name == "evaluation")
    assert report.privacy["epsilon_spent"] == 0.0 and report.privacy["epsilon_left"] == 8.0
    assert "no rounds yet" in next(c.detail for c in report.checks if c.name == "privacy budget")
    assert report.data_reports[0]["rows_read"] == report.data_reports[0]["rows_kept"] == rows
    # The check saved nothing: at most the store's lock file exists.
    assert {p.name for p in state.iterdir()} <= {"state.lock"}


def test_the_check_shows_the_sites_own_evaluation_choice_and_its_test_file_rows(tmp_path):
    # Prepare: the site trains on everything in data-path and evaluates on its own test file, one bad row in it.
    data, state, key, _ = make_site(tmp_path)
    first = data.read_text().splitlines()[1].split(",")
    test = tmp_path / "next.csv"
    test.write_text(f"user,item\n{first[0]},{first[1]}\nnobody,{first[1]}\n")
    # Execute
    refusing = check_site(data, state, max_epsilon=8.0, state_key_file=key, run_config=DP_RUN,
                          node_config={"evaluate": False})  # fmt: skip
    given = check_site(data, state, max_epsilon=8.0, state_key_file=key, run_config=DP_RUN,
                       node_config={"test-path": str(test)})  # fmt: skip
    # Assert
    assert "refuses every evaluation" in next(c.detail for c in refusing.checks if c.name == "evaluation")
    assert "given" in next(c.detail for c in given.checks if c.name == "evaluation")
    assert any("next.csv:3: field 'user'" in line for line in given.issue_lines)


def test_epsilon_spent_after_a_real_private_round_is_shown(trained):
    # Prepare
    data, state, key, reply = trained
    sent = LedgerEntry.from_config_record(reply.content["ledger"])
    # Execute: no --run-config: the settings recorded by the node's round are used.
    report = check_site(data, state, max_epsilon=8.0, state_key_file=key)
    # Assert: the epsilon the node reported to the server, from the persisted accountant.
    assert report.ready, report.problems
    assert report.privacy["epsilon_spent"] == pytest.approx(sent.epsilon_after)
    assert report.privacy["delta"] == pytest.approx(sent.delta)
    assert (report.privacy["rounds_trained"], report.privacy["ledger_entries"]) == (1, 1)
    assert report.privacy["epsilon_left"] == pytest.approx(8.0 - sent.epsilon_after)
    assert report.settings_source == "the run config recorded by the node's last round"
    assert "encrypted with key id" in next(c.detail for c in report.checks if c.name == "state").lower()


def records_of(content) -> list[dict]:
    """The reply as the site check describes it: record name, kind, array names/shapes or keys."""
    described = []
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            items = [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in record.items()]
            described.append({"record": name, "kind": "arrays", "items": items})
        else:
            kind = {MetricRecord: "metrics", ConfigRecord: "config"}[type(record)]
            described.append({"record": name, "kind": kind, "keys": list(record.keys())})
    return described


def test_what_the_check_says_is_shared_is_exactly_what_the_handlers_send(trained, tmp_path):
    # Prepare: the DP reply of the trained site, an evaluation reply, and a reply of a round without DP.
    data, state, key, dp_reply = trained
    evaluation = one_round(run_config(**{"noise-multiplier": 1.5}), node_config(data, state, key), "evaluate")
    plain_data, plain_state, plain_key, _ = make_site(tmp_path)
    plain_reply = one_round(run_config(), node_config(plain_data, plain_state, plain_key))
    # Execute
    report = check_site(data, state, state_key_file=key)
    # Assert: same records, same array names and shapes, same metric and ledger keys.
    assert report.shared["train (DP on)"] == records_of(dp_reply.content)
    assert report.shared["train (DP off)"] == records_of(plain_reply.content)
    assert report.shared["evaluate (DP on)"] == records_of(evaluation.content)
    plain_evaluation = one_round(run_config(), node_config(plain_data, plain_state, plain_key), "evaluate")
    assert report.shared["evaluate (DP off)"] == records_of(plain_evaluation.content)


def test_bad_rows_are_reported_with_file_and_line_and_the_site_is_not_ready(tmp_path):
    # Prepare: a site file with an unknown item on line 3 and a bad timestamp on line 4.
    data, state, key, _ = make_site(tmp_path)
    data.write_text("user,item,behaviour,timestamp,value\n"
                    "alice,i00001,purchase,1700000000,\n"
                    "alice,not-in-catalogue,click,1700000100,\n"
                    "bob,i00002,view,yesterday,\n"
                    "bob,i00003,click,1700000300,\n")  # fmt: skip
    # Execute
    report = check_site(data, state, max_epsilon=8.0, state_key_file=key, run_config=DP_RUN)
    result = runner.invoke(app, ["site", "check", "--data-path", str(data), "--state-dir", str(state),
                                 "--state-key-file", str(key), "--run-config", f"data='{DATA}'"])  # fmt: skip
    # Assert: nothing dropped silently: both rows named by file and line, and the site is not ready.
    assert not report.ready
    assert [c.name for c in report.problems] == ["data rows"]
    assert report.data_reports[0]["rows_skipped"] == 2
    assert any("events.csv:3" in line and "'item'" in line for line in report.issue_lines)
    assert any("events.csv:4" in line and "'timestamp'" in line for line in report.issue_lines)
    assert result.exit_code == 1
    assert "events.csv:3" in result.output and "events.csv:4" in result.output and "NOT READY" in result.output


def test_a_wrong_or_missing_key_fails_closed_and_touches_nothing(trained, tmp_path):
    # Prepare
    data, state, _, _ = trained
    other_key = write_new_key_file(tmp_path / "other.key")
    before = dir_digest(state)
    # Execute
    wrong = check_site(data, state, max_epsilon=8.0, state_key_file=tmp_path / "other.key")
    missing = check_site(data, state, max_epsilon=8.0)
    # Assert: not ready, the key named as the problem, no epsilon read past a failed key.
    assert not wrong.ready and not missing.ready
    wrong_detail = next(c.detail for c in wrong.problems if c.name == "state")
    assert "wrong key" in wrong_detail and other_key.key_id in wrong_detail
    assert "no state key is configured" in next(c.detail for c in missing.problems if c.name == "state")
    assert "epsilon_spent" not in wrong.privacy and "epsilon_spent" not in missing.privacy
    assert dir_digest(state) == before


def test_a_plaintext_state_is_called_plaintext(tmp_path):
    # Prepare: a state written without a key.
    data, state, _, _ = make_site(tmp_path)
    ClientStateStore(state, create=False, key=None).update_meta(rounds_trained=0)
    # Execute
    report = check_site(data, state, max_epsilon=8.0, run_config=DP_RUN)
    # Assert: not ready, since the node would refuse a plaintext accountant, and it says how to fix it...
    assert [c.name for c in report.problems] == ["state key"]
    assert "allow-plaintext-state" in report.problems[0].detail
    key_check = next(c for c in report.checks if c.name == "state")
    assert key_check.status == WARNING and "plaintext" in key_check.detail
    assert "fedtower state encrypt" in key_check.detail
    # ...ready once the site accepts plaintext explicitly in its node config.
    accepted = check_site(data, state, max_epsilon=8.0, run_config=DP_RUN,
                          node_config={"allow-plaintext-state": True, "dp-population-users": 30})  # fmt: skip
    assert accepted.ready, accepted.problems
    assert statuses(accepted)["population"] == "ok" and statuses(accepted)["rollback counter"] == "warning"


def test_the_whole_node_config_is_checked_as_the_node_parses_it(tmp_path):
    data, state, key, _ = make_site(tmp_path)
    typo = check_site(data, state, state_key_file=key, run_config=DP_RUN, node_config={"max-epsilom": 2.0})
    assert [c.name for c in typo.problems] == ["node config"] and "max-epsilom" in typo.problems[0].detail
    seeded = check_site(data, state, state_key_file=key, run_config=DP_RUN,
                        node_config={"test-only-insecure-dp-seed": 1})  # fmt: skip
    assert [c.name for c in seeded.problems] == ["DP randomness"]


def test_every_problem_is_listed_at_once(tmp_path):
    # Prepare: a state dir open to others, an empty data file, a DP-off run config with a max-epsilon.
    data, state, key, _ = make_site(tmp_path)
    state.chmod(0o755)
    data.write_text("user,item,behaviour,timestamp,value\n")
    # Execute
    report = check_site(data, state, max_epsilon=2.0, state_key_file=key,
                        run_config={"data": DATA, "noise-multiplier": 0.0})  # fmt: skip
    result = runner.invoke(app, ["site", "check", "--data-path", str(data), "--state-dir", str(state),
                                 "--state-key-file", str(key), "--max-epsilon", "2", "--json",
                                 "--run-config", f"data='{DATA}' noise-multiplier=0.0"])  # fmt: skip
    # Assert
    problems = {c.name: c.detail for c in report.problems}
    assert "chmod 700" in problems["state dir"]
    assert "DP off" in problems["privacy budget"]
    assert "no valid events" in problems["data"]
    assert result.exit_code == 1
    printed = json.loads(result.output)
    assert printed["ready"] is False and len(printed["problems"]) == len(report.problems) == 3


def test_a_missing_state_dir_says_how_to_create_it(tmp_path):
    data, _, key, _ = make_site(tmp_path)
    report = check_site(data, tmp_path / "nowhere", state_key_file=key, run_config=DP_RUN)
    assert not report.ready
    assert "mkdir -m 700" in next(c.detail for c in report.problems if c.name == "state dir")


def test_an_exhausted_budget_is_a_warning_not_a_failure(trained):
    data, state, key, _ = trained
    report = check_site(data, state, max_epsilon=0.01, state_key_file=key)
    budget = next(c for c in report.checks if c.name == "privacy budget")
    assert report.ready and budget.status == WARNING and "Exhausted" in budget.detail
    assert report.privacy["epsilon_left"] == 0.0
    assert PROBLEM not in statuses(report).values()


def test_site_ledger_prints_the_nodes_own_entries(trained):
    # Prepare
    data, state, key, reply = trained
    sent = LedgerEntry.from_config_record(reply.content["ledger"])
    # Execute
    table = runner.invoke(app, ["site", "ledger", "--state-dir", str(state), "--state-key-file", str(key)])
    raw = runner.invoke(app, ["site", "ledger", "--state-dir", str(state), "--state-key-file", str(key), "--json"])
    # Assert
    assert table.exit_code == 0 and "trained" in table.output and f"{sent.epsilon_after:.4f}" in table.output
    listed = [entry_of(e) for e in json.loads(raw.output)]
    assert listed[0] == sent  # (a DP evaluation of the same site may follow it)
    assert [e.status for e in listed[1:]] in ([], ["evaluated"])


def test_a_fresh_site_is_told_to_name_the_catalogue_rather_than_checked_against_a_default(tmp_path):
    # Prepare: no round yet, and no --run-config: the run's catalogue is unknown.
    data, state, key, _ = make_site(tmp_path)
    # Execute
    report = check_site(data, state, max_epsilon=8.0, state_key_file=key)
    # Assert: one clear problem; the rows were not checked against some other catalogue.
    assert [c.name for c in report.problems] == ["catalogue"]
    assert "--run-config" in report.problems[0].detail
    assert report.data_reports == [] and report.shared == {}
