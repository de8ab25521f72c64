"""Each client computes with the torch threads it was given, not one per core it sees."""

import os

import pytest
import torch

from fedtower.client.handlers import train_on_node
from fedtower.client.node_settings import NodeSettings
from fedtower.client.threads import DEFAULT_MAX_THREADS, available_cores, client_threads
from fedtower.config import RunSettings
from fedtower.server.federation import initial_item_tower
from tests.flower_utils import node_context, server_message, task_identity


def test_the_sites_setting_wins_then_the_simulations_cpus_then_the_capped_cores():
    # Execute / Assert: hand-worked cases of the rule.
    assert client_threads(node_threads=3, simulated=True, client_num_cpus=1.0) == 3
    assert client_threads(node_threads=None, simulated=True, client_num_cpus=2.5) == 2
    assert client_threads(node_threads=None, simulated=True, client_num_cpus=0.5) == 1  # a fraction of a core
    assert client_threads(node_threads=None, simulated=False, client_num_cpus=8.0) == min(
        available_cores(), DEFAULT_MAX_THREADS
    )


def test_available_cores_follows_the_process_affinity():
    assert available_cores() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", [0, -2, 1.5, "2", True])
def test_a_bad_thread_count_is_refused_naming_the_key(value):
    with pytest.raises(ValueError, match="torch-threads"):
        NodeSettings.from_node_config({"torch-threads": value})


@pytest.fixture()
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("site_threads", "client_cpus", "expected"), [(None, 2.0, 2), (1, 2.0, 1), (None, 1.0, 1)])
def test_a_training_message_runs_with_the_threads_it_was_given(tmp_path, restore_threads, site_threads,
                                                                client_cpus, expected):  # fmt: skip
    # Prepare: a simulated site; torch starts with a different count than the one expected.
    run_config = RunSettings(data="synthetic:users=60,items=80,seed=2", num_sites=2, dim=8, local_epochs=1,
                             output_dir=str(tmp_path), run_name="t", history_len=20,
                             client_num_cpus=client_cpus).to_run_config()  # fmt: skip
    node = {"partition-id": 0, "num-partitions": 2}
    if site_threads is not None:
        node["torch-threads"] = site_threads
    torch.set_num_threads(3)
    tower = initial_item_tower(RunSettings.from_run_config(run_config))
    # Execute
    with task_identity():
        train_on_node(server_message(tower, node_id=5), node_context(node, run_config))
    # Assert
    assert torch.get_num_threads() == expected
