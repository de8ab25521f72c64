"""Whole federations on Flower's simulation engine (Ray), started for real."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtower.central import popularity_baseline
from fedtower.client.handlers import evaluate_on_node, train_on_node
from fedtower.client.state import ClientStateStore
from fedtower.config import RunSettings
from fedtower.data.prepared import prepare_split
from fedtower.data.sources import resolve_dataset
from fedtower.server.run_dir import RunDirectory
from fedtower.simulations.runner import simulate

pytestmark = pytest.mark.simulation

DATA = "synthetic:users=150,items=200,seed=2"
FAST = {"data": DATA, "num-sites": 3, "dim": 16, "history-len": 50, "local-epochs": 2, "eval-every": 1}


def settings_for(tmp_path, name, **overrides):
    return RunSettings.from_run_config({**FAST, "output-dir": str(tmp_path), "run-name": name, **overrides})


def test_sites_simulation_writes_a_complete_run_directory(tmp_path):
    # Prepare
    settings = settings_for(tmp_path, "sites", **{"num-server-rounds": 3})
    # Execute
    result = simulate(settings)
    # Assert: every output a user looks at exists and is consistent.
    run = RunDirectory(result["run_dir"], create=False)
    evaluated = [row for row in run.history() if row["phase"] == "evaluate"]
    assert [row["round"] for row in evaluated] == [1, 2, 3]
    split = prepare_split(resolve_dataset(DATA)[0])
    users_with_test = int((split.test.lengths() > 0).sum())
    assert evaluated[-1]["users"] == users_with_test  # every user, each once, from its own site
    popularity = popularity_baseline(split).finalize()
    assert evaluated[-1]["ndcg@20"] > popularity["ndcg@20"]
    assert run.load_latest_checkpoint().round == 3
    summary = (run.path / "summary.txt").read_text()
    assert summary.count("ndcg@20") == 2  # the metrics table, and the model against popularity on the same split
    assert "model / popularity" in summary
    assert (run.plots_dir / "ranking.png").stat().st_size > 5000
    assert "ndcg@20" in (run.path / "metrics.csv").read_text().splitlines()[0]
    assert json.loads((run.path / "config.json").read_text())["num-sites"] == 3
    assert result["rejected"] == []


def faulty_client_app(run_config: dict) -> ClientApp:
    """Partition 0 raises mid-round; partition 1 replies with NaN weights."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        if partition == 0:
            raise RuntimeError("disk on fire")
        reply = train_on_node(message, context, run_config)
        if partition == 1:
            arrays = reply.content["arrays"]
            key = next(iter(arrays.keys()))
            poisoned = arrays[key].numpy().copy()
            poisoned[0, 0] = np.nan
            from flwr.app import Array

            arrays[key] = Array(poisoned)
        return reply

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return evaluate_on_node(message, context, run_config)

    return app


def test_failing_and_malformed_clients_do_not_stop_the_round(tmp_path, caplog):
    # Prepare
    settings = settings_for(tmp_path, "faulty", **{"num-server-rounds": 2})
    # Execute
    result = simulate(settings, client_app=faulty_client_app(settings.to_run_config()))
    # Assert: both rounds completed on the remaining site; the NaN reply was rejected with a reason.
    run = RunDirectory(result["run_dir"], create=False)
    assert [r["round"] for r in run.history() if r["phase"] == "train"] == [1, 2]
    assert run.load_latest_checkpoint().round == 2
    assert [(r, reason) for r, _, reason in result["rejected"]] == [
        (1, "'item_tower.id_embedding.weight' holds NaN or Inf"),
        (2, "'item_tower.id_embedding.weight' holds NaN or Inf"),
    ]
    checkpoint = run.load_latest_checkpoint()
    assert all(np.isfinite(a).all() for a in checkpoint.arrays.values())


def _run_cli(args, **kwargs):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedtower.cli", "simulate", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)  # fmt: skip


def test_server_killed_mid_run_resumes_from_its_last_checkpoint(tmp_path):
    # Prepare: a 5-round run in a separate process group, killed once round 2 is checkpointed.
    out = tmp_path / "killed"
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in {**FAST, "num-server-rounds": 5}.items())
    process = _run_cli(["--out", str(out), "--run-config", overrides])
    latest = out / "checkpoints" / "latest.json"
    deadline = time.time() + 150
    try:
        while time.time() < deadline and process.poll() is None:
            if latest.exists() and json.loads(latest.read_text()).get("round", 0) >= 2:
                break
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it could be killed:\n" + process.stdout.read()
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    killed_at = RunDirectory(out, create=False).load_latest_checkpoint()
    assert 2 <= killed_at.round < 5

    # Execute: resume with the saved config.
    resumed = _run_cli(["--out", str(out), "--resume"])
    try:
        output, _ = resumed.communicate(timeout=180)
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
    assert resumed.returncode == 0, output

    # Assert: rounds after the checkpoint ran, once, from exactly the checkpointed tower.
    run = RunDirectory(out, create=False)
    assert run.load_latest_checkpoint().round == 5
    train_rounds = [r["round"] for r in run.history() if r["phase"] == "train"]
    assert train_rounds == sorted(set(train_rounds)) and train_rounds[-1] == 5
    assert f"after round {killed_at.round}" in output
    digests = [ClientStateStore(d).meta()["received"] for d in sorted((out / "clients").iterdir())]
    first_resumed = str(killed_at.round + 1)
    assert {d[first_resumed] for d in digests} == {killed_at.extra["digest"]}


def test_run_ends_when_every_client_has_spent_its_budget(tmp_path):
    # Prepare: DP with a run-level cap that allows about two rounds per site.
    settings = settings_for(tmp_path, "budget", **{"num-server-rounds": 8, "noise-multiplier": 1.0,
                                                   "max-epsilon": 5.0, "dp-batch-size": 16,
                                                   "local-epochs": 1, "eval-every": 4})  # fmt: skip
    # Execute
    result = simulate(settings)
    # Assert: the run stopped early, every site is exhausted, and no site went past its cap.
    run = RunDirectory(result["run_dir"], create=False)
    trained_rounds = [r["round"] for r in run.history() if r["phase"] == "train"]
    assert 1 <= max(trained_rounds) < 8
    assert len(result["exhausted"]) == 3
    trained = [e for e in result["ledger"] if e["status"] == "trained"]
    assert trained and max(e["epsilon_after"] for e in trained) <= 5.0
    # DP evaluations (eval-every 4) are charged and logged too; a withheld one leaves no entry.
    assert {"trained", "budget-exhausted"} <= {e["status"] for e in result["ledger"]}
    assert {e["status"] for e in result["ledger"]} <= {"trained", "budget-exhausted", "evaluated"}
    assert (run.plots_dir / "epsilon.png").exists()
    assert "Privacy" in (run.path / "summary.txt").read_text()


@pytest.mark.parametrize("mode", ["server-side", "client-side", "poisson"])
def test_client_level_dp_runs_with_flowers_wrappers_and_accountant(tmp_path, mode):
    # Prepare: one-user-style clients are simulated by sites here; the wrapper does not care.
    settings = settings_for(tmp_path, mode, **{"num-server-rounds": 2, "client-dp": mode,
                                               "client-dp-noise": 0.5, "client-dp-clip": 0.5,
                                               "eval-every": 2})  # fmt: skip
    # Execute
    result = simulate(settings)
    # Assert: both rounds released, epsilon grows each round, and it is checkpointed for a resume.
    train_rows = [r for r in result["history"] if r["phase"] == "train"]
    epsilons = [r["epsilon-client-dp"] for r in train_rows]
    assert len(epsilons) == 2 and 0 < epsilons[0] < epsilons[1]
    checkpoint = RunDirectory(result["run_dir"], create=False).load_latest_checkpoint()
    assert "client_dp_accountant" in checkpoint.extra


def test_a_poisson_client_dp_run_with_fedadam_resumes_its_accountant_and_moments(tmp_path):
    # Prepare: two rounds of Poisson-sampled client-level DP (rate 0.5) under FedAdam, then a resume to 3.
    config = {"client-dp": "poisson", "client-dp-noise": 1.0, "client-dp-clip": 0.5, "fraction-train": 0.5,
              "strategy": "fedadam", "server-tau": 1e-8, "eval-every": 5}  # fmt: skip
    first = simulate(settings_for(tmp_path, "poisson", **{"num-server-rounds": 2, **config}))

    # Execute
    resumed = simulate(settings_for(tmp_path, "poisson", **{"num-server-rounds": 3, "resume": True, **config}))

    # Assert: epsilon continues from round 2 (the accountant holds three steps at rate 0.5, noise 1, not
    # one), and the checkpoint holds FedAdam's moments beside the accountant.
    epsilons = [r["epsilon-client-dp"] for r in resumed["history"] if r["phase"] == "train"]
    first_epsilons = [r["epsilon-client-dp"] for r in first["history"] if r["phase"] == "train"]
    assert epsilons[-1] > first_epsilons[-1]
    checkpoint = RunDirectory(resumed["run_dir"], create=False).load_latest_checkpoint()
    assert checkpoint.round == 3 and "client_dp_accountant" in checkpoint.extra
    assert any(key.startswith("m_t/") for key in checkpoint.strategy_state)
    assert checkpoint.extra["client_dp_accountant"]["history"] == [[1.0, 0.5, 3]]



def test_a_given_split_runs_through_the_simulation_and_a_site_that_refuses_evaluation_is_left_out(tmp_path):
    # Prepare: a published-style split (train file; test file with 20 negatives per user, no timestamps).
    from fedtower.client.local import partition_config, run_dataset
    from fedtower.data.partition import partition_users
    from fedtower.data.protocols import SplitSpec

    dataset = resolve_dataset(DATA)[0]
    loo = prepare_split(dataset, spec=SplitSpec("leave-one-out", num_negatives=20))
    ids = np.array(dataset.catalogue.index.ids)
    train_rows = [f"{user},{ids[item]}" for u, user in enumerate(loo.users) for item in loo.train.items_of(u)]
    (tmp_path / "train.csv").write_text("user,item\n" + "\n".join(train_rows) + "\n")
    test_rows = [f"{loo.users[u]},{ids[p]},{' '.join(ids[n])}" for u, p, n in
                 zip(loo.sampled.user_rows, loo.sampled.positives, loo.sampled.negatives)]  # fmt: skip
    (tmp_path / "test.csv").write_text("user,item,negatives\n" + "\n".join(test_rows) + "\n")
    settings = settings_for(tmp_path, "given", **{"num-server-rounds": 1, "split": "given", "event-order": "file",
                                                  "train-data": str(tmp_path / "train.csv"),
                                                  "test-data": str(tmp_path / "test.csv")})  # fmt: skip
    # Execute: site 0 refuses evaluation in its node config.
    result = simulate(settings, per_site={0: {"evaluate": False}})
    # Assert: the other sites' users, each scored by full ranking and against the file's own negatives.
    sites = partition_users(run_dataset(settings), partition_config(settings, 3))
    evaluating = len(sites[1]) + len(sites[2])
    final = [row for row in result["history"] if row["phase"] == "evaluate"][-1]
    assert final["users"] == final["sampled-rows"] == evaluating < len(loo.users)
    assert final["sampled-negatives"] == 20 and 0 < final["sampled-hr@10"] <= 1
    summary = (RunDirectory(result["run_dir"], create=False).path / "summary.txt").read_text()
    assert "Evaluation: given" in summary and "sampled-hr@10" in summary
