"""fedtower on Flower's deployment engine: a real SuperLink, two real SuperNodes, `flwr run`.

Everything runs on loopback with an isolated FLWR_HOME; every process the test
starts, and every process Flower starts for it, is stopped at the end.
"""

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedtower.client.state import ClientStateStore
from fedtower.privacy.accounting import independent_epsilon
from fedtower.privacy.ledger import ServerLedger, entry_dicts
from fedtower.server.run_dir import RunDirectory
from tests.deployment_utils import planned_epsilons, prepare_sites, run_to_completion

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tracking reads /proc"),
]

DATA = "synthetic:users=120,items=150,seed=0"
RUN_TIMEOUT_S = 150.0


def run_config(output_dir, run_name: str, rounds: int, **overrides) -> dict:
    """A small, fast run on CPU that waits for both sites before it starts."""
    return {
        "data": DATA,
        "num-server-rounds": rounds,
        "eval-every": 1,
        "dim": 16,
        "history-len": 50,
        "local-epochs": 1,
        "num-negatives": 32,
        "device": "cpu",
        "min-available-nodes": 2,
        "min-train-nodes": 2,
        "min-evaluate-nodes": 2,
        "round-timeout": 120.0,
        "output-dir": str(output_dir),
        "run-name": run_name,
        **overrides,
    }


def test_two_site_deployment_trains_evaluates_and_keeps_node_state(tmp_path):
    rounds = 2
    # Prepare: two sites' event files (the catalogue is public: it comes from `data`), empty state dirs.
    sites = prepare_sites(DATA, 2, tmp_path / "sites")
    config = run_config(tmp_path / "runs", "deploy", rounds)  # every round trains and evaluates on all users

    # Execute: SuperLink + 2 SuperNodes, `flwr run <repo> <connection> --stream`, everything stopped.
    done = run_to_completion(tmp_path / "flower", sites, config, timeout=RUN_TIMEOUT_S)
    print(f"\ndeployment: {done.timings()}")

    # Assert: the server's run directory.
    run = RunDirectory(tmp_path / "runs" / "deploy", create=False)
    assert json.loads((run.path / "config.json").read_text())["num-server-rounds"] == rounds
    evaluated = {row["round"]: row for row in run.history() if row["phase"] == "evaluate"}
    assert sorted(evaluated) == [1, 2], done.log
    for row in evaluated.values():
        assert row["ndcg@20"] > 0
        assert row["users"] == sum(site.users_with_test for site in sites)
    assert {row["round"] for row in run.history() if row["phase"] == "train"} == {1, 2}
    checkpoint = run.load_latest_checkpoint()
    assert checkpoint is not None and checkpoint.round == rounds
    assert run.load_checkpoint(rounds).arrays
    assert (run.path / "summary.txt").read_text().strip()

    # Assert: each site's private state, in its own state dir, trained on its own users only.
    for site in sites:
        manifest = json.loads((site.state_dir / "manifest.json").read_text())
        assert {"users", "optimizer", "item_tower", "meta"} <= set(manifest["components"])
        store = ClientStateStore(site.state_dir, create=False)
        meta = store.load("meta")
        assert meta["rounds_trained"] == rounds
        assert meta["last_round"] == rounds
        assert meta["data_source"] == str(site.data_path)
        assert set(store.load("users")["users"]) == site.users


def test_user_level_dp_deployment_caps_one_site_and_keeps_a_verifiable_ledger(tmp_path):
    rounds, run_name = 3, "deploy-dp"
    sites = prepare_sites(DATA, 2, tmp_path / "sites")
    config = run_config(
        tmp_path / "runs", run_name, rounds,
        **{"noise-multiplier": 1.0, "dp-batch-size": 8, "privacy-unit": "user",
           # No federated evaluation (the test above covers it): every message costs each node a fresh
           # ClientApp process, and this keeps the module within ~3 minutes on 2 cores.
           "fraction-evaluate": 0.0,
           # Site 0 drops out after round 1: training must go on with site 1 alone. (The server stops
           # sampling an exhausted node; with 2 nodes required it would end the run instead.)
           "min-available-nodes": 1, "min-train-nodes": 1},
    )  # fmt: skip
    # Site 0's own budget: halfway between the ε its first round reaches and the ε a second round would
    # reach, both computed by the client's own planning code (plan_round / ClientAccountant, the same
    # noise calibration, sample rate and δ) on site 0's own events. So round 1 fits under the cap and
    # round 2 does not, with a margin (~0.35 in ε here) far above the planner's 1e-6 relative slack.
    epsilons = {index: planned_epsilons(config, site, rounds) for index, site in enumerate(sites)}
    first, second = epsilons[0][:2]
    assert first < second, epsilons
    cap = (first + second) / 2
    sites[0].extra_node_config["max-epsilon"] = cap  # site 1: no cap

    done = run_to_completion(tmp_path / "flower", sites, config, timeout=RUN_TIMEOUT_S)
    print(f"\ndeployment with DP: {done.timings()}")

    # Assert: the server's run directory; training went on after site 0 ran out of budget.
    run = RunDirectory(tmp_path / "runs" / run_name, create=False)
    train_rows = [row for row in run.history() if row["phase"] == "train"]
    assert [row["round"] for row in train_rows] == [1, 2, 3], done.log
    for row in train_rows:
        # DP replies carry a constant weight and no loss (only num-examples=1 and budget-exhausted), and
        # an exhausted site's reply is never aggregated.
        assert "train-loss" not in row and "train-seconds" not in row, row
        assert row["budget-exhausted"] == 0, row
    assert not [row for row in run.history() if row["phase"] == "evaluate"]
    checkpoint = run.load_latest_checkpoint()
    assert checkpoint is not None and checkpoint.round == rounds

    # Assert: the server's privacy ledger, which must be exactly what each site logged itself.
    ledger = ServerLedger(run.path)
    entries = entry_dicts(ledger.entries())
    audit = ledger.verify_all()  # ε recomputed independently, each node's history chained round to round
    assert audit.ok, audit.summary()
    by_node: dict[str, list[dict]] = {}
    for entry in entries:
        by_node.setdefault(entry["node"], []).append(entry)
    assert len(by_node) == 2, entries
    site_entries = []
    for site in sites:
        assert (site.state_dir / "ledger.jsonl").is_file()
        local = entry_dicts(ClientStateStore(site.state_dir, create=False).read_ledger())
        assert local and len({entry["node"] for entry in local}) == 1, local
        assert by_node[local[0]["node"]] == local  # the server's copy, field for field
        site_entries.append(local)
    for entry in entries:
        assert entry["run"] == run_name and entry["unit"] == "user" and entry["weights"] == "constant"
        assert entry["noise_multiplier"] == 1.0
        recomputed = independent_epsilon(history=entry["history"], delta=entry["delta"])
        assert math.isclose(entry["epsilon_after"], recomputed, rel_tol=1e-6), entry

    # Site 0: trained round 1, refused round 2 (ε unchanged, no steps), then was no longer asked to train.
    trained, refused = site_entries[0]
    assert (trained["round"], trained["status"]) == (1, "trained")
    assert (refused["round"], refused["status"], refused["steps"]) == (2, "budget-exhausted", 0)
    assert math.isclose(trained["epsilon_after"], first, rel_tol=1e-6) and trained["epsilon_after"] <= cap
    assert refused["history"] == trained["history"]
    assert math.isclose(refused["epsilon_before"], trained["epsilon_after"], rel_tol=1e-9)
    assert math.isclose(refused["epsilon_after"], trained["epsilon_after"], rel_tol=1e-9)
    # Site 1: trained every round, its ε growing as planned.
    assert [(e["round"], e["status"]) for e in site_entries[1]] == [(r, "trained") for r in range(1, rounds + 1)]
    spent = [entry["epsilon_after"] for entry in site_entries[1]]
    assert all(a < b for a, b in zip(spent, spent[1:])), spent
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(spent, epsilons[1], strict=True)), spent
    for previous, entry in zip(site_entries[1], site_entries[1][1:]):
        assert math.isclose(entry["epsilon_before"], previous["epsilon_after"], rel_tol=1e-9)

    # Assert: each site's state dir holds the accountant its last ledger entry describes.
    for site, local, rounds_trained, last_round in ((sites[0], site_entries[0], 1, 2),
                                                    (sites[1], site_entries[1], rounds, rounds)):  # fmt: skip
        store = ClientStateStore(site.state_dir, create=False)
        accountant = store.load("accountant")
        assert accountant["mechanism"] == "rdp"
        assert accountant["history"] == local[-1]["history"]
        assert store.load("calibration")["noise_multiplier"] == 1.0
        meta = store.load("meta")
        assert (meta["rounds_trained"], meta["last_round"]) == (rounds_trained, last_round)
        assert set(store.load("users")["users"]) == site.users
        assert not store.has("optimizer")  # the non-DP optimizer never ran


def test_site_workers_serve_every_message_of_a_site_and_leave_with_their_supernodes(tmp_path, monkeypatch):
    # Prepare: two sites that keep a site worker; its socket goes to a short private dir (sun_path is 108 bytes).
    runtime = Path(tempfile.mkdtemp(prefix="ftw-"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))  # the SuperNodes inherit this environment
    sites = prepare_sites(DATA, 2, tmp_path / "sites")
    for site in sites:
        site.extra_node_config.update({"site-worker": True, "site-worker-idle-seconds": 300.0})
    config = run_config(tmp_path / "runs", "workers", 2)

    # Execute
    done = run_to_completion(tmp_path / "flower", sites, config, timeout=RUN_TIMEOUT_S)
    print(f"\ndeployment with site workers: {done.timings()}")

    # Assert: both rounds trained and evaluated on every user.
    run = RunDirectory(tmp_path / "runs" / "workers", create=False)
    evaluated = {row["round"]: row for row in run.history() if row["phase"] == "evaluate"}
    assert sorted(evaluated) == [1, 2], done.log
    assert evaluated[2]["users"] == sum(site.users_with_test for site in sites)
    for site in sites:
        assert ClientStateStore(site.state_dir, create=False).load("meta")["rounds_trained"] == 2
    # Assert: `flwr run --stream` shows fedtower's line per round, Flower's detail is in the run dir.
    assert "Round 1/2 trained" in done.log and "Round 2/2 trained" in done.log and "[ROUND" not in done.log
    assert "[ROUND 2/2]" in (tmp_path / "runs" / "workers" / "flower.log").read_text()
    # Assert: each SuperNode started its worker once, for its four messages; one socket per site.
    for name in ("supernode-0", "supernode-1"):
        assert (Path(done.log_dir) / f"{name}.log").read_text().count("Started the site worker") == 1
    assert len(list((runtime / f"fedtower-{os.getuid()}").glob("worker-*.sock"))) <= 2
    # Assert: each worker's log has one line per message it answered (2 trains, 2 evaluations), and no
    # reply was cut off (an empty last part once raced the ClientApp's close).
    worker_logs = list((runtime / f"fedtower-{os.getuid()}").glob("worker-*.log"))
    assert len(worker_logs) == 2
    for worker_log in worker_logs:
        text = worker_log.read_text()
        assert text.count("message answered") == 4 and "left before the reply" not in text, text
    # Assert: with the deployment stopped, no worker of these sites is left.
    deadline = time.monotonic() + 30
    while _site_workers(sites) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _site_workers(sites)
    shutil.rmtree(runtime, ignore_errors=True)


def _site_workers(sites) -> list[int]:
    """Pids of live site workers serving these sites' state dirs."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"fedtower.client.site_worker" in cmdline and state not in ("Z", "X"):
            if any(str(site.state_dir).encode() in cmdline for site in sites):
                pids.append(int(proc.name))
    return pids
