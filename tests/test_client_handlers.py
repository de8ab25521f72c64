"""The client's train/evaluate handlers, called directly as a SuperNode would."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, MetricRecord

from fedtower.client.handlers import evaluate_on_node, train_on_node
from fedtower.client.state import ClientStateStore, StateError
from fedtower.config import RunSettings
from fedtower.metrics import RankingSums
from fedtower.server.federation import initial_item_tower
from tests.flower_utils import node_context, server_message, task_identity

DATA = "synthetic:users=90,items=120,seed=4"


@pytest.fixture()
def run_config(tmp_path):
    return RunSettings(data=DATA, num_sites=3, dim=16, local_epochs=1, output_dir=str(tmp_path),
                       run_name="t", history_len=50).to_run_config()  # fmt: skip


@pytest.fixture()
def global_tower(run_config):
    return initial_item_tower(RunSettings.from_run_config(run_config))


def test_train_reply_holds_exactly_the_item_tower_and_aggregate_metrics(run_config, global_tower):
    # Prepare: partition 1 of 3 in simulation.
    context = node_context({"partition-id": 1, "num-partitions": 3}, run_config)
    with task_identity():
        message = server_message(global_tower, node_id=11)
        # Execute
        reply = train_on_node(message, context)
    # Assert: one ArrayRecord with exactly the item-tower keys and shapes, nothing user-level.
    arrays = [r for r in reply.content.values() if isinstance(r, ArrayRecord)]
    assert len(arrays) == 1
    assert list(arrays[0].keys()) == list(global_tower.keys())
    assert all(k.startswith("item_tower.") for k in arrays[0].keys())
    for key, array in arrays[0].items():
        assert array.shape == global_tower[key].shape
    metrics = [r for r in reply.content.values() if isinstance(r, MetricRecord)]
    assert len(metrics) == 1
    assert set(metrics[0].keys()) == {"num-examples", "train-loss", "train-seconds"}
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    # The trained tower differs from the global one (it did train).
    assert any((arrays[0][k].numpy() != global_tower[k].numpy()).any() for k in global_tower.keys())


def test_private_state_persists_across_messages_and_processes(run_config, global_tower, tmp_path):
    # Prepare
    context = node_context({"partition-id": 0, "num-partitions": 3}, run_config)
    state_dir = RunSettings.from_run_config(run_config).node_state_dir(0)
    with task_identity():
        # Execute: two training rounds, each as a fresh call (as a fresh process would be).
        train_on_node(server_message(global_tower, node_id=3, server_round=1), context)
        first = ClientStateStore(state_dir).load("users")
        train_on_node(server_message(global_tower, node_id=3, server_round=2), context)
    # Assert: the user embeddings were carried over and moved on; counters advanced.
    store = ClientStateStore(state_dir)
    second = store.load("users")
    assert first["users"] == second["users"]
    assert first["embeddings"].abs().sum() > 0
    assert not (first["embeddings"] == second["embeddings"]).all()
    assert store.meta()["rounds_trained"] == 2 and store.meta()["last_round"] == 2
    assert set(store.load("item_tower")) == set(global_tower.keys())


def test_evaluate_reply_is_mergeable_sums_only(run_config, global_tower):
    # Prepare
    context = node_context({"partition-id": 2, "num-partitions": 3}, run_config)
    with task_identity():
        # Execute
        reply = evaluate_on_node(server_message(global_tower, node_id=5, message_type="evaluate"), context)
    # Assert: no arrays, and metrics that merge as RankingSums.
    assert set(reply.content.keys()) == {"metrics"}
    sums = RankingSums.from_dict(dict(reply.content["metrics"]))
    assert sums.users > 0
    assert 0.0 <= sums.finalize()["ndcg@20"] <= 1.0


def test_corrupt_state_is_a_clear_error_never_a_reset(run_config, global_tower):
    # Prepare: train once, then flip a byte of the saved user embeddings.
    context = node_context({"partition-id": 0, "num-partitions": 3}, run_config)
    state_dir = RunSettings.from_run_config(run_config).node_state_dir(0)
    with task_identity():
        train_on_node(server_message(global_tower, node_id=3), context)
        users_file = next(state_dir.glob("users.*.pt"))
        raw = bytearray(users_file.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        users_file.write_bytes(bytes(raw))
        # Execute / Assert
        with pytest.raises(StateError, match="checksum"):
            train_on_node(server_message(global_tower, node_id=3, server_round=2), context)
    # The corrupt state was not replaced by a fresh one.
    assert ClientStateStore(state_dir).meta()["rounds_trained"] == 1


def test_deployment_state_dir_must_exist(run_config, global_tower, tmp_path):
    # Prepare: a site whose configured state dir was never created.
    events = tmp_path / "site"
    from fedtower.data.sources import resolve_dataset
    from fedtower.data.synthetic import to_folder

    to_folder(resolve_dataset(DATA)[0], events)
    context = node_context({"data-path": str(events / "events.csv"),
                            "state-dir": str(tmp_path / "missing")}, run_config)  # fmt: skip
    with task_identity():
        # Execute / Assert
        with pytest.raises(StateError, match="does not exist. Create it once"):
            train_on_node(server_message(global_tower, node_id=9), context)


def test_node_without_data_is_told_why(run_config, global_tower):
    context = node_context({}, run_config)
    with task_identity():
        with pytest.raises(ValueError, match="no `state-dir`|neither `data-path`"):
            train_on_node(server_message(global_tower, node_id=9), context)


def test_wrong_item_tower_is_refused(run_config):
    # Prepare: a server tower built for another dim.
    other = initial_item_tower(RunSettings.from_run_config({**run_config, "dim": 8}))
    context = node_context({"partition-id": 0, "num-partitions": 3}, run_config)
    with task_identity():
        with pytest.raises(ValueError, match="shape"):
            train_on_node(server_message(other, node_id=3), context)


def test_site_events_are_mapped_onto_the_servers_catalogue_and_unknown_items_reported(tmp_path, caplog):
    # Prepare: a site file with one event for an item the public catalogue does not have (line 3).
    from fedtower.client.local import load_node_data

    site = tmp_path / "site.csv"
    site.write_text(
        "user,item,behaviour,timestamp,value\n"
        "alice,i00001,purchase,1700000000,\n"
        "alice,not-in-catalogue,click,1700000100,\n"
        "alice,i00002,view,1700000200,\n"
        "bob,i00003,click,1700000300,\n"
    )
    settings = RunSettings(data=DATA)
    # Execute
    with caplog.at_level("WARNING", logger="fedtower.client"):
        data = load_node_data(settings, {"data-path": str(site)})
    # Assert: the unknown item is reported with file, line and field; the rest map to catalogue rows.
    assert "site.csv:3" in caplog.text and "'item'" in caplog.text
    assert data.users == ["alice", "bob"]
    rows = data.catalogue.index.rows(["i00001", "i00002", "i00003"])
    assert sorted(np.concatenate([data.split.train.items, data.split.test.items])) == sorted(rows)


def test_only_a_simulations_own_state_skips_fsync(run_config, tmp_path):
    # Prepare: a simulated partition (state dir made under the run) and a site (state dir it created).
    from fedtower.client.handlers import open_state
    from fedtower.client.node_settings import NodeSettings

    settings = RunSettings.from_run_config(run_config)
    site_dir = tmp_path / "site-state"
    site_dir.mkdir(mode=0o700)
    simulated = NodeSettings.from_node_config({"partition-id": 0, "num-partitions": 3})
    site = NodeSettings.from_node_config({"data-path": str(tmp_path / "events.csv"), "state-dir": str(site_dir),
                                          "allow-plaintext-state": True})  # fmt: skip

    # Execute / Assert: a site's generations are always fsynced.
    assert open_state(settings, simulated).durable is False
    assert open_state(settings, site).durable is True


class ArrivingNodes:
    """A grid whose nodes connect one more at each look, as Flower's simulated nodes register."""

    def __init__(self):
        self.looks = 0

    def get_node_ids(self):
        self.looks += 1
        return list(range(self.looks))


def test_the_federation_waits_for_every_node_before_sizing_its_first_round():
    from fedtower.server.federation import wait_for_nodes

    # Execute / Assert: 4 nodes are there at the 4th look.
    grid = ArrivingNodes()
    wait_for_nodes(grid, 4, timeout=5.0, poll=0.001)
    assert grid.looks == 4
    # ... and a count that never arrives ends in an error that says what was missing.
    with pytest.raises(RuntimeError, match=r"Only \d+ of the 10\^6 nodes|Only \d+ of the 1000000 nodes"):
        wait_for_nodes(ArrivingNodes(), 1_000_000, timeout=0.05, poll=0.001)


def test_the_simulation_grid_polls_for_replies_every_10_ms_and_other_grids_are_left_alone():
    # Prepare: Flower's own in-memory grid, as run_simulation builds it.
    import sys

    import flwr.simulation.run_simulation  # noqa: F401 - the module, for the names it builds its grid from

    flower_simulation = sys.modules["flwr.simulation.run_simulation"]

    from fedtower.server.federation import poll_replies_promptly
    from fedtower.simulations.in_process import InProcessGrid

    factory = flower_simulation.LinkStateFactory(flower_simulation.FLWR_IN_MEMORY_DB_NAME,
                                                 flower_simulation.NoOpFederationManager(),
                                                 flower_simulation.ObjectStoreFactory())  # fmt: skip
    grid = flower_simulation.InMemoryGrid(state_factory=factory)
    assert grid.pull_interval == pytest.approx(0.1)  # Flower's default, which this test depends on
    in_process = InProcessGrid({})

    # Execute
    poll_replies_promptly(grid)
    poll_replies_promptly(in_process)

    # Assert
    assert grid.pull_interval == pytest.approx(0.01)
    assert not hasattr(in_process, "pull_interval")


def test_a_coordinator_cannot_make_a_dp_site_refit_its_users_outside_dp(run_config, global_tower):
    # Prepare: the coordinator's run config asks for DP and, beside it, a non-private reconstruction.
    hostile = {**run_config, "noise-multiplier": 1.0, "reconstruction-epochs": 3}
    context = node_context({"partition-id": 0, "num-partitions": 3, "dp-population-users": 30}, hostile)
    with task_identity():
        # Execute / Assert: the site refuses before touching its state or training.
        with pytest.raises(ValueError, match="reconstruction-epochs applies to non-private runs only"):
            train_on_node(server_message(global_tower, node_id=9), context)
    assert not (RunSettings.from_run_config(run_config).run_dir / "clients").exists()
