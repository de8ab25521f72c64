"""The client's train/evaluate handlers on each device: CPU always, CUDA where one is visible.

The CPU cases exercise the same checks everywhere (so the test itself is tested in CI);
the CUDA cases are skipped without a GPU. What must hold on any device: the reply holds
exactly the item tower as CPU tensors, finite and trained; evaluation merges; the node's
private state is saved on the CPU. Figures for CUDA are in notes/gpu-check.md.
"""

import pytest
import torch

from fedtower.client.handlers import evaluate_on_node, train_on_node
from fedtower.client.local import pick_device
from fedtower.client.state import ClientStateStore
from fedtower.config import RunSettings
from fedtower.metrics import RankingSums
from fedtower.server.federation import initial_item_tower
from tests.flower_utils import node_context, server_message, task_identity

DATA = "synthetic:users=60,items=80,seed=2"
NO_CUDA = not torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device"))]
MODES = {
    "no-dp": {},
    "dp-user": {"privacy_unit": "user", "noise_multiplier": 1.0, "dp_batch_size": 8},
    "dp-interaction": {"privacy_unit": "interaction", "noise_multiplier": 1.0, "dp_batch_size": 64},
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("device", DEVICES)
def test_train_and_evaluate_on_device(tmp_path, device, mode):
    # Prepare: partition 0 of 2, the given device and privacy mode.
    settings = RunSettings(data=DATA, num_sites=2, dim=16, local_epochs=1, history_len=50, device=device,
                           output_dir=str(tmp_path), run_name="gpu", **MODES[mode])  # fmt: skip
    run_config = settings.to_run_config()
    tower = initial_item_tower(settings)
    # Exact evaluation sums in DP modes too (the site opts in), to check the metrics on the device.
    context = node_context({"partition-id": 0, "num-partitions": 2, "allow-raw-evaluation": True}, run_config)
    with task_identity():
        # Execute: two rounds (the second loads the state the first saved), then evaluation.
        for server_round in (1, 2):
            reply = train_on_node(server_message(tower, node_id=1, server_round=server_round), context)
        trained = reply.content["arrays"]
        evaluated = evaluate_on_node(server_message(trained, node_id=1, message_type="evaluate"), context)
    # Assert: exactly the item tower, on the CPU, finite, and moved by training.
    sent, start = trained.to_torch_state_dict(), tower.to_torch_state_dict()
    assert set(sent) == set(start)
    for key, tensor in sent.items():
        assert tensor.device.type == "cpu" and tensor.shape == start[key].shape
        assert torch.isfinite(tensor).all(), key
    assert any(not torch.equal(sent[k], start[k]) for k in sent)
    sums = RankingSums.from_dict(dict(evaluated.content["metrics"]))
    assert sums.users > 0 and 0.0 <= sums.finalize()["ndcg@20"] <= 1.0
    # The node's private state was written from the CPU and reads back there.
    store = ClientStateStore(settings.node_state_dir(0))
    assert store.meta()["rounds_trained"] == 2
    assert store.load("users")["embeddings"].device.type == "cpu"


@pytest.mark.skipif(not NO_CUDA, reason="checks the message given where no CUDA device is visible")
def test_asking_for_cuda_without_one_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device is available"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_auto_picks_cuda_when_one_is_visible():
    assert pick_device("auto").type == "cuda"
