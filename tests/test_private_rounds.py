"""DP rounds through the client's real train handler: accounting, budgets, ledger, replies."""

import numpy as np
import pytest

from fedtower.client.handlers import BudgetRefusal, evaluate_on_node, train_on_node
from fedtower.client.state import ClientStateStore, StateError
from fedtower.config import RunSettings
from fedtower.privacy.accounting import ClientAccountant, independent_epsilon
from fedtower.privacy.ledger import LedgerEntry, entry_of, ledger_line_of, record_digest, verify_entry
from fedtower.server.federation import initial_item_tower
from tests.flower_utils import node_context, server_message, task_identity

DATA = "synthetic:users=90,items=120,seed=4"


def run_config(tmp_path, **dp):
    base = RunSettings(data=DATA, num_sites=3, dim=16, local_epochs=1, output_dir=str(tmp_path), run_name="dp",
                       history_len=30, dp_batch_size=8, num_negatives=16)  # fmt: skip
    return {**base.to_run_config(), **dp}


def one_round(config, server_round, node_config=None, global_tower=None):
    global_tower = global_tower or initial_item_tower(RunSettings.from_run_config(config))
    context = node_context(node_config or {"partition-id": 0, "num-partitions": 3}, config)
    with task_identity():
        return train_on_node(server_message(global_tower, node_id=3, server_round=server_round), context), \
            global_tower  # fmt: skip


def state_of(config) -> ClientStateStore:
    return ClientStateStore(RunSettings.from_run_config(config).node_state_dir(0))


def test_dp_rounds_compose_in_a_persistent_accountant_and_the_ledger(tmp_path):
    # Prepare
    config = run_config(tmp_path, **{"noise-multiplier": 1.5})
    # Execute: two rounds, each a fresh call as a fresh client process would make.
    first, tower = one_round(config, 1)
    second, _ = one_round(config, 2, global_tower=tower)
    # Assert: the replies hold a constant weight, a status and the ledger entry; nothing else.
    for reply in (first, second):
        assert set(reply.content.keys()) == {"arrays", "metrics", "ledger"}
        assert dict(reply.content["metrics"]) == {"num-examples": 1, "budget-exhausted": 0}
    entries = [LedgerEntry.from_config_record(r.content["ledger"]) for r in (first, second)]
    assert entries[0].epsilon_before == 0.0
    assert entries[1].epsilon_before == pytest.approx(entries[0].epsilon_after)
    assert entries[1].epsilon_after > entries[0].epsilon_after
    # Round 1 charged the run's DP count of the site's users (no population declared), then its steps.
    count_noise = 20.0
    assert entries[0].population_source == "dp-count"
    assert entries[0].charged == ((count_noise, 1.0, 1), (1.5, entries[0].sample_rate, entries[0].steps))
    assert entries[1].charged == ((1.5, entries[0].sample_rate, entries[1].steps),)
    assert entries[0].sample_rate == pytest.approx(8 / entries[0].population)  # q from the public count
    # The accountant in the state composes both rounds, and an independent RDP accountant agrees.
    accountant = ClientAccountant.from_state_dict(state_of(config).load("accountant"))
    assert accountant.total_steps == 1 + entries[0].steps + entries[1].steps
    assert accountant.epsilon(delta=entries[1].delta) == pytest.approx(entries[1].epsilon_after)
    assert independent_epsilon(history=entries[1].history, delta=entries[1].delta) == pytest.approx(
        entries[1].epsilon_after, rel=1e-6)
    # The client kept its own copy of the ledger.
    local = state_of(config).read_ledger()
    assert [entry_of(e).round for e in local] == [1, 2]
    # ...signed, as the replies carried it, and chained: round 2 names round 1's record.
    assert local == [ledger_line_of(r.content["ledger"]) for r in (first, second)]
    assert [entry_of(e).sequence for e in local] == [1, 2]
    assert entry_of(local[1]).previous == entry_of(local[1]).previous_in_run == record_digest(local[0])
    assert all(verify_entry(e) for e in local)


def test_a_client_that_trained_without_an_accountant_refuses_dp(tmp_path):
    # Prepare: one non-private round, so there is history but no accountant.
    one_round(run_config(tmp_path), 1)
    # Execute / Assert: fails closed instead of starting from epsilon = 0.
    with pytest.raises(StateError, match="no privacy accountant"):
        one_round(run_config(tmp_path, **{"noise-multiplier": 1.0}), 2)


def test_a_corrupt_accountant_is_never_a_fresh_start(tmp_path):
    config = run_config(tmp_path, **{"noise-multiplier": 1.0})
    one_round(config, 1)
    accountant_file = next(state_of(config).state_dir.glob("accountant.*.json"))
    accountant_file.write_text('{"mechanism": "rdp", "history": []}')
    with pytest.raises(StateError, match="checksum"):
        one_round(config, 2)


def test_budget_is_checked_before_training_and_exhaustion_is_not_an_error(tmp_path):
    # Prepare: the site caps epsilon far below what one round costs.
    config = run_config(tmp_path, **{"noise-multiplier": 1.0})
    node = {"partition-id": 0, "num-partitions": 3, "max-epsilon": 0.01}
    # Execute
    reply, tower = one_round(config, 1, node_config=node)
    # Assert: explicit status, the global tower sent back untouched, nothing trained or spent.
    assert reply.content["metrics"]["budget-exhausted"] == 1
    for key in tower.keys():
        np.testing.assert_array_equal(reply.content["arrays"][key].numpy(), tower[key].numpy())
    entry = LedgerEntry.from_config_record(reply.content["ledger"])
    assert (entry.status, entry.steps, entry.epsilon_after) == ("budget-exhausted", 0, 0.0)
    store = state_of(config)
    assert store.meta()["rounds_trained"] == 0
    assert store.load("accountant", default=None) is None
    # It stays available for evaluation, which it withholds (a DP evaluation would exceed the cap too)...
    with task_identity():
        evaluation = evaluate_on_node(server_message(tower, node_id=3, message_type="evaluate"),
                                      node_context(node, config))  # fmt: skip
    assert dict(evaluation.content["metrics"]) == {"num-examples": 1, "evaluation-withheld": 1}
    # ...unless the site opts in to exact sums, which costs no epsilon and says so in the ledger.
    with task_identity():
        evaluation = evaluate_on_node(server_message(tower, node_id=3, message_type="evaluate"),
                                      node_context({**node, "allow-raw-evaluation": True}, config))  # fmt: skip
    assert evaluation.content["metrics"]["users"] > 0 and evaluation.content["metrics"]["raw-evaluation"] == 1
    assert LedgerEntry.from_config_record(evaluation.content["ledger"]).status == "raw-evaluation"
    assert store.load("accountant", default=None) is None


def test_a_site_with_its_own_cap_refuses_a_run_without_dp(tmp_path):
    # Prepare: the coordinator's run has no DP; the site set max-epsilon in its node config.
    config = run_config(tmp_path)
    capped = {"partition-id": 0, "num-partitions": 3, "max-epsilon": 4.0}
    # Execute / Assert: refused before anything is trained or saved, with the reason and the way out.
    with pytest.raises(BudgetRefusal, match=r"max-epsilon = 4.0 .* without differential privacy"):
        one_round(config, 1, node_config=capped)
    assert not RunSettings.from_run_config(config).node_state_dir(0).exists()
    # The same run trains on a site without a cap.
    reply, _ = one_round(config, 1)
    assert reply.content["metrics"]["num-examples"] > 1


def test_target_epsilon_is_calibrated_once_and_reached_at_the_planned_end(tmp_path):
    # Prepare: a run planned for 3 rounds at epsilon 4 (no evaluation, so training spends all of it).
    config = run_config(tmp_path, **{"target-epsilon": 4.0, "num-server-rounds": 3, "fraction-evaluate": 0.0})
    # Execute: the planned rounds, then one more.
    entries, tower = [], None
    for server_round in (1, 2, 3, 4):
        reply, tower = one_round(config, server_round, global_tower=tower)
        entries.append(LedgerEntry.from_config_record(reply.content["ledger"]))
    # Assert: one noise multiplier for the whole run; epsilon lands on the target; round 4 refused.
    assert len({e.noise_multiplier for e in entries}) == 1
    assert [e.status for e in entries] == ["trained", "trained", "trained", "budget-exhausted"]
    assert 3.9 <= entries[2].epsilon_after <= 4.0 * (1 + 1e-6)
    # delta comes from the public population (here the DP count), never from the private n.
    assert entries[0].delta == pytest.approx(1 / (10 * entries[0].population))
    users = len(state_of(config).load("users")["users"])  # every local user has training history
    assert entries[0].delta < 1 / users
