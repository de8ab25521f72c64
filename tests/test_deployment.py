"""fedtower on Flower's deployment engine: a real SuperLink, two real SuperNodes, `flwr run`.

Everything runs on loopback with an isolated FLWR_HOME; every process the test
starts, and every process Flower starts for it, is stopped at the end.
"""

import json
import sys
import time

import pytest

from fedtower.client.state import ClientStateStore
from fedtower.server.run_dir import RunDirectory
from tests.deployment_utils import REPO_ROOT, local_deployment, prepare_sites

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tracking reads /proc"),
]

DATA = "synthetic:users=120,items=150,seed=0"
ROUNDS = 2
RUN_TIMEOUT_S = 150.0


def test_two_site_deployment_trains_evaluates_and_keeps_node_state(tmp_path):
    # Prepare: two sites' event files (the catalogue is public: it comes from `data`), empty state dirs.
    sites = prepare_sites(DATA, 2, tmp_path / "sites")
    output_dir = tmp_path / "runs"
    run_config = {
        "data": DATA,
        "num-server-rounds": ROUNDS,
        "eval-every": 1,
        "dim": 16,
        "history-len": 50,
        "local-epochs": 1,
        "num-negatives": 32,
        "device": "cpu",
        # Wait for both sites, so every round trains and evaluates on all users.
        "min-available-nodes": 2,
        "min-train-nodes": 2,
        "min-evaluate-nodes": 2,
        "round-timeout": 120.0,
        "output-dir": str(output_dir),
        "run-name": "deploy",
    }
    started = time.monotonic()

    # Execute: SuperLink + 2 SuperNodes, then `flwr run <repo> <connection> --stream`.
    with local_deployment(tmp_path / "flower", sites) as deployment:
        ready = time.monotonic()
        run_id, log = deployment.run_app(REPO_ROOT, run_config, timeout=RUN_TIMEOUT_S)
        status = deployment.run_status(run_id)
        assert status == "finished:completed", f"run {run_id} ended {status}\n{deployment.tracker.all_logs()}"
        finished = time.monotonic()
    stopped = time.monotonic()
    print(f"\ndeployment: start {ready - started:.1f} s, run {finished - ready:.1f} s, "
          f"stop {stopped - finished:.1f} s")  # fmt: skip

    # Assert: the server's run directory.
    run = RunDirectory(output_dir / "deploy", create=False)
    assert json.loads((run.path / "config.json").read_text())["num-server-rounds"] == ROUNDS
    evaluated = {row["round"]: row for row in run.history() if row["phase"] == "evaluate"}
    assert sorted(evaluated) == [1, 2], log
    expected_users = sum(site.users_with_test for site in sites)
    for row in evaluated.values():
        assert row["ndcg@20"] > 0
        assert row["users"] == expected_users
    assert {row["round"] for row in run.history() if row["phase"] == "train"} == {1, 2}
    checkpoint = run.load_latest_checkpoint()
    assert checkpoint is not None and checkpoint.round == ROUNDS
    assert run.load_checkpoint(ROUNDS).arrays
    assert (run.path / "summary.txt").read_text().strip()

    # Assert: each site's private state, in its own state dir, trained on its own users only.
    for site in sites:
        manifest = json.loads((site.state_dir / "manifest.json").read_text())
        assert {"users", "optimizer", "item_tower", "meta"} <= set(manifest["components"])
        store = ClientStateStore(site.state_dir, create=False)
        meta = store.load("meta")
        assert meta["rounds_trained"] == ROUNDS
        assert meta["last_round"] == ROUNDS
        assert meta["data_source"] == str(site.data_path)
        assert set(store.load("users")["users"]) == site.users
