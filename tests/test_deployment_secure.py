"""fedtower on Flower's deployment engine with TLS and SuperNode authentication, and what survives a crash.

Real processes on loopback (tests/deployment_utils.py, `secure=True`): a SuperLink
with TLS (`--ssl-ca-certfile --ssl-certfile --ssl-keyfile`) and node authentication
(`--enable-supernode-auth`, each node's public key registered with `flwr
supernode register`), plus a SQLite database (`--database`) where the SuperLink
itself is restarted; SuperNodes dial it with the CA
(`--root-certificates`) and their own EC key; the `flwr` CLI connection names
the CA (`root-certificates`). Every process a test starts, and everything Flower
starts for it, is stopped by that test; the TLS deployment shared by the first
two tests is stopped by its module fixture.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.proto.fleet_pb2 import ActivateNodeRequest, PullMessagesRequest  # pylint: disable=E0611
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

from fedtower.client.state import ClientStateStore
from fedtower.privacy.accounting import independent_epsilon
from fedtower.privacy.audit import audit_records
from fedtower.privacy.ledger import ServerLedger, entry_dicts, pseudonymous_node_id
from fedtower.server.run_dir import RunDirectory
from tests.deployment_utils import (
    REPO_ROOT,
    LocalDeployment,
    Site,
    flower_env,
    flwr_cli,
    free_ports,
    local_deployment,
    planned_epsilons,
    prepare_sites,
    supernode_argv,
    write_flower_config,
)

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tracking reads /proc"),
]

DATA = "synthetic:users=120,items=150,seed=0"
RUN_TIMEOUT_S = 240.0
REFUSAL_TIMEOUT_S = 60.0
# A SIGKILLed SuperNode stays "online" on the SuperLink until its heartbeats lapse (2 x 30 s in flwr 1.41:
# HEARTBEAT_PATIENCE x HEARTBEAT_DEFAULT_INTERVAL); until then the SuperLink refuses to activate it again.
OFFLINE_TIMEOUT_S = 150.0


def dp_config(output_dir: Path, run_name: str, rounds: int, nodes: int, **overrides) -> dict:
    """A small user-level DP run on CPU that waits for all `nodes` and samples all of them each round.

    min-train-nodes = nodes, not only min-available-nodes: Flower's FedAvg sizes its sample from the nodes
    connected *before* it waits for min-available-nodes, so a node that reconnects during that wait would
    otherwise be connected but not sampled (flwr/serverapp/strategy/fedavg.py, configure_train).
    """
    return {
        "data": DATA,
        "num-server-rounds": rounds,
        "eval-every": rounds,  # federated evaluation after the last round only
        "dim": 16,
        "history-len": 50,
        "local-epochs": 1,
        "num-negatives": 32,
        "device": "cpu",
        "noise-multiplier": 1.0,
        "dp-batch-size": 8,
        "privacy-unit": "user",
        "min-available-nodes": nodes,
        "min-train-nodes": nodes,
        "min-evaluate-nodes": nodes,
        "round-timeout": 180.0,
        "output-dir": str(output_dir),
        "run-name": run_name,
        **overrides,
    }


def latest_checkpoint_round(run_path: Path) -> int:
    if not (run_path / "checkpoints").is_dir():
        return 0
    checkpoint = RunDirectory(run_path, create=False).load_latest_checkpoint()
    return checkpoint.round if checkpoint is not None else 0


def clientapp_pids(deployment: LocalDeployment, node: str) -> set[int]:
    """The `flwr-clientapp` processes (one per message being handled) under SuperNode `node` now."""
    pids = set()
    for pid in deployment.tracker.tree(deployment.current[node]):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"flwr-clientapp" in cmdline:
            pids.add(pid)
    return pids


def wait_for_next_round_clientapps(
    deployment: LocalDeployment, run_path: Path, checkpoint: int, nodes: list[str]
) -> dict[str, set[int]]:
    """Wait for round `checkpoint`'s checkpoint, then until every node in `nodes` runs a ClientApp of the
    next round; returns those ClientApps' pids by node.

    The next round's messages are sent only after the checkpoint is written, so a ClientApp listed before
    a look that found no checkpoint belongs to an earlier round (list first, then look) and is never
    taken for the next round's, however quickly a node picks up its next message.
    """
    earlier: dict[str, set[int]] = {node: set() for node in nodes}

    def checkpointed() -> bool:
        listed = {node: clientapp_pids(deployment, node) for node in nodes}
        if latest_checkpoint_round(run_path) >= checkpoint:
            return True
        for node in nodes:
            earlier[node] |= listed[node]
        return False

    def next_round_started() -> dict[str, set[int]] | None:
        new = {node: clientapp_pids(deployment, node) - earlier[node] for node in nodes}
        return new if all(new.values()) else None

    deployment.wait(checkpointed, RUN_TIMEOUT_S, f"round {checkpoint}'s checkpoint", poll=0.2)
    return deployment.wait(next_round_started, 60.0, f"round {checkpoint + 1}'s ClientApps", poll=0.05)


def ledger_by_node(entries: list[dict]) -> dict[str, list[dict]]:
    by_node: dict[str, list[dict]] = {}
    for entry in entries:
        by_node.setdefault(entry["node"], []).append(entry)
    return by_node


def isclose(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6)


# ---------------------------------------------------------------- a. and b.: one TLS deployment, three sites


@dataclass
class SecureFederation:
    deployment: LocalDeployment
    sites: list[Site]
    root: Path
    config: dict
    rounds: int
    planned: list[list[float]]  # ε after each round at each site, from the client's own planning code
    caps: list[float]  # each site's own max-epsilon (node config)


@pytest.fixture(scope="module")
def secure_federation(tmp_path_factory):
    """Three sites (disjoint users, each its own max-epsilon) behind one SuperLink with TLS and node auth."""
    root = tmp_path_factory.mktemp("secure")
    rounds = 2
    sites = prepare_sites(DATA, 3, root / "sites")
    config = dp_config(root / "runs", "secure", rounds, nodes=3)
    planned = [planned_epsilons(config, site, rounds) for site in sites]
    # Sites 0 and 1: caps above what two rounds spend, different per site. Site 2: halfway between its
    # round-1 and round-2 ε, so it trains round 1 and refuses round 2 (a margin far above the planner's slack).
    caps = [planned[0][-1] * 1.5, planned[1][-1] * 2.0, (planned[2][0] + planned[2][1]) / 2]
    for site, cap in zip(sites, caps, strict=True):
        site.extra_node_config["max-epsilon"] = cap
    with local_deployment(root / "flower", sites, secure=True) as deployment:
        yield SecureFederation(deployment, sites, root, config, rounds, planned, caps)


def test_three_authenticated_sites_over_tls_train_under_dp_and_keep_a_verifiable_ledger(secure_federation):
    fed = secure_federation
    deployment, sites, rounds, run_name = fed.deployment, fed.sites, fed.rounds, fed.config["run-name"]
    # Prepare (fixture): the SuperLink serves HTTPS only, and the three registered nodes are online.
    assert "Uvicorn running on https://" in deployment.log_of("superlink")
    assert "--insecure" not in deployment.launch["superlink"][0]
    nodes = deployment.nodes()
    assert {nodes.get(node_id) for node_id in deployment.node_ids.values()} == {"online"}, nodes

    # Execute: `flwr run` over the TLS connection (config.toml `root-certificates`), to the end.
    run_id, log = deployment.run_app(REPO_ROOT, fed.config, timeout=RUN_TIMEOUT_S)
    status = deployment.run_status(run_id)

    # Assert: the run and the server's run directory.
    assert status == "finished:completed", log
    run = RunDirectory(fed.root / "runs" / run_name, create=False)
    train_rows = [row for row in run.history() if row["phase"] == "train"]
    assert [row["round"] for row in train_rows] == [1, 2], log
    for row in train_rows:
        assert "train-loss" not in row and row["budget-exhausted"] == 0, row  # an exhausted reply is not aggregated
    evaluated = [row for row in run.history() if row["phase"] == "evaluate"]
    assert [row["round"] for row in evaluated] == [rounds], log
    # A DP evaluation: each site's six noisy sums (std 20 x sqrt(6)), merged; no exact count, no coverage.
    noise = evaluated[0]["dp-noise-std"]
    assert isclose(noise, 20.0 * math.sqrt(6) * math.sqrt(3)) and evaluated[0]["dp-nodes"] == 3, evaluated
    assert abs(evaluated[0]["users"] - sum(site.users_with_test for site in sites)) < 5 * noise
    assert "coverage@20" not in evaluated[0], evaluated
    # With ~40 users a site, the noise can swamp the count (users < 1): then no mean is reported at all.
    assert ("ndcg@20-noise" in evaluated[0]) == (evaluated[0]["users"] >= 1), evaluated
    checkpoint = run.load_latest_checkpoint()
    assert checkpoint is not None and checkpoint.round == rounds

    # Assert: the server's privacy ledger names exactly the three authenticated nodes (by pseudonym of
    # their registered node id) and holds, field for field, what each site logged itself.
    ledger = ServerLedger(run.path)
    audit = ledger.verify_all()
    assert audit.ok, audit.summary()
    # The auditor's check: every line signed and chained, every epsilon recomputed by dp-accounting, and
    # the server's lines exactly the sites' own.
    own = {str(site.state_dir): ClientStateStore(site.state_dir, create=False).read_ledger() for site in sites}
    report = audit_records(ledger.entries(), site_ledgers=own)
    assert report.ok, report.summary()
    by_node = ledger_by_node(entry_dicts(ledger.entries()))
    local = [entry_dicts(ClientStateStore(site.state_dir, create=False).read_ledger()) for site in sites]
    pseudonyms = [entries[0]["node"] for entries in local]  # each node's own secret pseudonym for the run
    assert sorted(by_node) == sorted(pseudonyms)
    for index in range(3):  # not the public-key HMAC of the node id that anyone could compute
        assert pseudonyms[index] != pseudonymous_node_id(deployment.node_ids[f"supernode-{index}"], run_name)
    for index, site in enumerate(sites):
        assert by_node[pseudonyms[index]] == local[index], index
        for entry in local[index]:
            assert entry["run"] == run_name and entry["unit"] == "user" and entry["weights"] == "constant"
            assert entry["epsilon_after"] <= fed.caps[index], (index, entry)
            assert isclose(entry["epsilon_after"], independent_epsilon(history=entry["history"], delta=entry["delta"]))
        for previous, entry in zip(local[index], local[index][1:]):
            assert isclose(entry["epsilon_before"], previous["epsilon_after"])  # one accountant, never reset
    # Sites 0 and 1 trained both rounds, ε growing exactly as planned on their own data, then evaluated.
    for index in (0, 1):
        statuses = [(e["round"], e["status"]) for e in local[index]]
        assert statuses == [(1, "trained"), (2, "trained"), (2, "evaluated")]
        spent = [entry["epsilon_after"] for entry in local[index][:2]]
        assert spent[0] < spent[1] and all(map(isclose, spent, fed.planned[index])), (spent, fed.planned[index])
        assert local[index][2]["added"] == [[20.0, 1.0, 1]]  # the DP evaluation it charged
    # Site 2 trained round 1 under its cap and refused round 2, which would have gone over it; its DP
    # evaluation (a small charge) still fit.
    trained, refused, evaluation = local[2]
    assert evaluation["status"] == "evaluated" and evaluation["epsilon_after"] <= fed.caps[2]
    assert (trained["round"], trained["status"]) == (1, "trained")
    assert isclose(trained["epsilon_after"], fed.planned[2][0])
    assert (refused["round"], refused["status"], refused["steps"]) == (2, "budget-exhausted", 0)
    assert fed.planned[2][1] > fed.caps[2]
    assert refused["history"] == trained["history"] and isclose(refused["epsilon_after"], trained["epsilon_after"])

    # Assert: each site's state holds the accountant its last ledger entry describes, and only its own users.
    for index, site in enumerate(sites):
        store = ClientStateStore(site.state_dir, create=False)
        store.verify()
        assert store.load("accountant")["history"] == local[index][-1]["history"]
        meta = store.load("meta")
        assert (meta["rounds_trained"], meta["last_round"]) == ((2, 2, 1)[index], rounds)
        assert set(store.load("users")["users"]) == site.users


def _http_status(call) -> int:
    """The HTTP status a Fleet API call ends with (200 when it succeeds)."""
    try:
        call()
    except httpx.HTTPStatusError as err:
        return err.response.status_code
    return 200


def test_tls_superlink_refuses_unregistered_wrong_key_and_plaintext_clients(secure_federation, tmp_path):
    deployment, tls = secure_federation.deployment, secure_federation.deployment.tls
    # Prepare: key pairs a site could hold, none of them usable.
    stranger_key, stranger_pub = tls.node_keys("stranger")  # a valid key pair, never registered
    impostor_key, _ = tls.node_keys("impostor")  # holds this private key, but the public key registered
    _, victim_pub = tls.node_keys("victim")  # for "it" belongs to another key pair (the victim's)
    victim_id = deployment.register(victim_pub)
    nodes_before = deployment.nodes()
    runs_before = deployment.runs()
    # The CLI on a machine whose connection is plaintext, or TLS without the CA.
    other_home = tmp_path / "flwr-home-other"
    write_flower_config(other_home, deployment.address, "plaintext", extra={"no-ca": {"address": deployment.address}})
    other_env = flower_env(other_home)
    ports = free_ports(3)

    # Execute: three SuperNodes started as a site would start them ...
    ca = tls.ca_cert
    refused = {
        "unregistered": deployment.tracker.start("refused-unregistered", supernode_argv(
            deployment.address, ports[0], root_certificates=ca, private_key=stranger_key)),
        "wrong-key": deployment.tracker.start("refused-wrong-key", supernode_argv(
            deployment.address, ports[1], root_certificates=ca, private_key=impostor_key)),
        # --insecure (plain HTTP) against the HTTPS port; without --max-retries it retries for ever.
        "plaintext": deployment.tracker.start("refused-plaintext", supernode_argv(
            deployment.address, ports[2], extra=["--max-retries", "2"])),
    }  # fmt: skip
    for name, popen in refused.items():
        deployment.wait(lambda popen=popen: popen.poll() is not None, REFUSAL_TIMEOUT_S, f"{name} SuperNode to exit")
    # ... a client speaking the Fleet API itself with the impostor's key: claiming the victim's registered
    # public key (signed with the wrong private key), and pulling a real site's messages under its own key.
    impostor = load_ssh_private_key(impostor_key.read_bytes(), password=None)
    victim_public = load_ssh_public_key(victim_pub.read_bytes())
    site_node = Node(node_id=deployment.node_ids["supernode-0"])

    def fleet(public_key):
        return FleetHttpClient.from_server_address(
            deployment.address,
            insecure=False,
            root_certificates=ca.read_bytes(),
            interceptors=[NodeAuthHttpInterceptor(impostor, public_key)],
        )

    with fleet(victim_public) as client:
        forged_activation = _http_status(lambda: client.ActivateNode(
            ActivateNodeRequest(public_key=public_key_to_bytes(victim_public), heartbeat_interval=30)))  # fmt: skip
    with fleet(impostor.public_key()) as client:
        foreign_pull = _http_status(lambda: client.PullMessages(PullMessagesRequest(node=site_node)))
    # ... and the `flwr` CLI without TLS (insecure = true), and with TLS but without the CA.
    cli_plain_ls = flwr_cli(other_env, "ls", "plaintext")
    cli_plain_run = flwr_cli(other_env, "run", str(REPO_ROOT), "plaintext", "--run-config",
                             f'data="{DATA}" num-server-rounds=1', timeout=120)  # fmt: skip
    cli_no_ca_ls = flwr_cli(other_env, "ls", "no-ca")

    # Assert: every SuperNode exited on its own with Flower's connection error (process status 1; the
    # log names exit code 305), and the SuperLink logged why for the two that reached it over TLS.
    superlink_log = deployment.log_of(deployment.current["superlink"])
    for name, popen in refused.items():
        assert popen.returncode == 1, (name, deployment.tracker.log_tail(f"refused-{name}"))
        assert "Exit Code: 305" in deployment.log_of(f"refused-{name}"), name
        assert "SuperNode ID:" not in deployment.log_of(f"refused-{name}"), name  # never got a node id
    for name, pub in (("unregistered", stranger_pub), ("wrong-key", tls.node_keys("impostor")[1])):
        assert "[code: 2004] Failed to activate SuperNode." in deployment.log_of(f"refused-{name}"), name
        key_pem = public_key_to_bytes(load_ssh_public_key(pub.read_bytes()))
        refusal = [line for line in superlink_log.splitlines() if repr(key_pem) in line]
        assert refusal and "No SuperNode found with the given public key" in refusal[0], (name, refusal)
    # The TLS port drops plain HTTP: the client sees a disconnect or a reset, depending on timing.
    plaintext_log = deployment.log_of("refused-plaintext")
    assert ("Server disconnected without sending a response" in plaintext_log
            or "Connection reset by peer" in plaintext_log), plaintext_log  # fmt: skip
    # The forged signature and the foreign node id were rejected by the node-authentication middleware
    # (401); an unknown but validly signed key gets 412 (above) instead.
    assert forged_activation == 401
    assert foreign_pull == 401
    # No refused key became a node; the victim's registration was never activated; the sites are still online.
    assert deployment.nodes() == {**nodes_before, victim_id: "registered"}
    assert set(deployment.nodes()) == set(deployment.node_ids.values()) | {victim_id}
    # The CLI: no connection without TLS, no trust without the CA, and no run was started.
    for result in (cli_plain_ls, cli_plain_run, cli_no_ca_ls):
        assert result.returncode != 0, (result.args, result.stdout, result.stderr)
        # flwr 1.41 reports a refused TLS handshake and a plaintext request alike.
        assert "Connection to the SuperLink is unavailable" in result.stdout + result.stderr, result.args
    assert deployment.runs() == runs_before


# ---------------------------------------------------------------- c. a SuperNode crashes mid-round


def test_supernode_killed_mid_round_rejoins_with_its_state_and_epsilon(tmp_path):
    rounds, run_name, victim = 3, "crash", "supernode-1"
    sites = prepare_sites(DATA, 2, tmp_path / "sites")
    config = dp_config(tmp_path / "runs", run_name, rounds, nodes=2, **{"fraction-evaluate": 0.0})
    planned = planned_epsilons(config, sites[1], 2)  # the victim trains two rounds: 1 and 3
    run_path = tmp_path / "runs" / run_name

    with local_deployment(tmp_path / "flower", sites, secure=True) as deployment:
        run = deployment.start_run(REPO_ROOT, config)
        # Execute: once round 1 is checkpointed, SIGKILL the victim's SuperNode with everything under it as
        # soon as its round-2 ClientApp starts (the node has pulled the round's message; it never replies).
        (round_two_clientapp,) = wait_for_next_round_clientapps(deployment, run_path, 1, [victim])[victim]
        killed = deployment.kill(victim)
        after_kill = ClientStateStore(sites[1].state_dir, create=False)
        version_after_kill = after_kill.verify()  # every component against its checksum
        ledger_after_kill = entry_dicts(after_kill.read_ledger())
        accountant_after_kill = after_kill.load("accountant")
        # Restart it (same key, same node config) once the SuperLink has noticed it is gone.
        deployment.wait_for_node_status(victim, "offline", OFFLINE_TIMEOUT_S, poll=2.0)
        deployment.restart(victim)
        deployment.wait_for_node_status(victim, "online", 60.0)
        run_id, log = deployment.wait_run(run, RUN_TIMEOUT_S)
        status = deployment.run_status(run_id)
        restarted_log = deployment.log_of(deployment.current[victim])

    # Assert: the kill hit the node while it handled round 2, before it saved anything for that round.
    assert round_two_clientapp in killed
    assert version_after_kill > 0
    assert [(e["round"], e["status"]) for e in ledger_after_kill] == [(1, "trained")]
    assert accountant_after_kill["history"] == ledger_after_kill[0]["history"]
    epsilon_before_crash = ledger_after_kill[0]["epsilon_after"]
    # The restarted node came back under its registered identity, and the run completed all rounds.
    assert f"SuperNode ID: {deployment.node_ids[victim]}" in restarted_log
    assert status == "finished:completed", log
    run_dir = RunDirectory(run_path, create=False)
    assert [row["round"] for row in run_dir.history() if row["phase"] == "train"] == [1, 2, 3]
    # The victim's state: intact, and its accountant continued from round 1 (ε never reset): round 3
    # starts at the ε round 1 reached and ends where the planner puts a second DP round.
    store = ClientStateStore(sites[1].state_dir, create=False)
    assert store.verify() > version_after_kill
    local = entry_dicts(store.read_ledger())
    assert [(e["round"], e["status"]) for e in local] == [(1, "trained"), (3, "trained")]
    assert local[0] == ledger_after_kill[0]
    assert isclose(local[1]["epsilon_before"], epsilon_before_crash)
    assert local[1]["epsilon_after"] > epsilon_before_crash
    assert all(map(isclose, [e["epsilon_after"] for e in local], planned)), (local, planned)
    assert store.load("accountant")["history"] == local[-1]["history"]
    meta = store.load("meta")
    assert (meta["rounds_trained"], meta["last_round"]) == (2, 3)
    assert sorted(meta["received"], key=int) == ["1", "3"]
    assert set(store.load("users")["users"]) == sites[1].users
    # The server's ledger: the other site trained every round, the victim rounds 1 and 3, the chain unbroken.
    ledger = ServerLedger(run_dir.path)
    audit = ledger.verify_all()
    assert audit.ok, audit.summary()
    by_node = ledger_by_node(entry_dicts(ledger.entries()))
    assert by_node[local[0]["node"]] == local
    survivor = by_node[entry_dicts(ClientStateStore(sites[0].state_dir, create=False).read_ledger())[0]["node"]]
    assert [(e["round"], e["status"]) for e in survivor] == [(r, "trained") for r in range(1, rounds + 1)]


# ---------------------------------------------------------------- d. the SuperLink crashes mid-run


def test_superlink_killed_mid_round_restarts_and_the_run_resumes_after_the_last_checkpoint(tmp_path):
    rounds, run_name, nodes = 2, "resume", ["supernode-0", "supernode-1"]
    sites = prepare_sites(DATA, 2, tmp_path / "sites")
    config = dp_config(tmp_path / "runs", run_name, rounds, nodes=2, **{"fraction-evaluate": 0.0})
    planned = [planned_epsilons(config, site, 3) for site in sites]
    run_path = tmp_path / "runs" / run_name

    # database=True keeps the SuperLink's state in a SQLite file (--database): the registered node keys
    # survive the restart, and the SuperNodes reconnect on their own.
    with local_deployment(tmp_path / "flower", sites, secure=True, database=True) as deployment:
        first = deployment.start_run(REPO_ROOT, config, name="flwr-run-1")
        # Execute: once round 1 is checkpointed and round 2 is under way at both sites, SIGKILL the
        # SuperLink with its SuperExec and the ServerApp.
        wait_for_next_round_clientapps(deployment, run_path, 1, nodes)
        deployment.kill("superlink")
        checkpoint_at_kill = latest_checkpoint_round(run_path)
        history_at_kill = RunDirectory(run_path, create=False).history()
        first_run_id = deployment.run_id("flwr-run-1")
        deployment.wait(lambda: first.poll() is not None, 60.0, "`flwr run --stream` to end with its SuperLink")
        # Restart it with the same database, certificates and port; then `flwr run` with resume=true.
        deployment.restart("superlink")
        # (The database still lists both nodes online; that they reconnected shows in run 2's ledger below.)
        deployment.wait(lambda: deployment.supernodes_online() == 2, 60.0, "both SuperNodes online", poll=1.0)
        second_id, second_log = deployment.run_app(REPO_ROOT, {**config, "resume": True}, RUN_TIMEOUT_S,
                                                   name="flwr-run-2")  # fmt: skip
        statuses = {run_id: deployment.run_status(run_id) for run_id in (first_run_id, second_id)}

    # Assert: the first run died with its SuperLink after round 1; the second run resumed after round 1.
    assert checkpoint_at_kill == 1
    assert [row["round"] for row in history_at_kill if row["phase"] == "train"] == [1]
    assert first.returncode != 0
    assert statuses[second_id] == "finished:completed", second_log
    # The dead run is never reported completed: still "running" until the restarted SuperLink notices that
    # its ServerApp's heartbeats stopped, then "finished:failed" (both seen, depending on timing).
    assert statuses[first_run_id] in ("running", "finished:failed"), statuses
    assert f"Resuming {run_name} after round 1" in second_log
    assert "starting from round 1" not in second_log
    run_dir = RunDirectory(run_path, create=False)
    train_rows = [row for row in run_dir.history() if row["phase"] == "train"]
    assert [row["round"] for row in train_rows] == [1, 2]
    assert train_rows[0] == history_at_kill[0]  # round 1 was not redone
    assert run_dir.load_latest_checkpoint().round == rounds
    round_one_digest = run_dir.load_checkpoint(1).extra["digest"]
    # Each site: the resumed round 2 started from checkpoint 1's item tower (not from the initial one), and
    # the accountant never reset. The round the crash cut off was trained and charged (its reply never
    # reached a ServerApp), then trained again: three DP rounds' worth of ε, exactly as planned.
    local = []
    for index, site in enumerate(sites):
        store = ClientStateStore(site.state_dir, create=False)
        store.verify()
        meta = store.load("meta")
        assert meta["received"]["2"] == round_one_digest != meta["received"]["1"]
        entries = entry_dicts(store.read_ledger())
        assert [(e["round"], e["status"]) for e in entries] == [(1, "trained"), (2, "trained"), (2, "trained")]
        assert all(map(isclose, [e["epsilon_after"] for e in entries], planned[index])), (entries, planned)
        for previous, entry in zip(entries, entries[1:]):
            assert isclose(entry["epsilon_before"], previous["epsilon_after"])
        assert store.load("accountant")["history"] == entries[-1]["history"]
        assert meta["rounds_trained"] == 3
        local.append(entries)
    # The server's ledger has rounds 1 (first run) and 2 (resumed run) per node, as the nodes logged them;
    # its audit flags, for each node, that round 2's history skips a round: the one lost with the SuperLink.
    ledger = ServerLedger(run_dir.path)
    by_node = ledger_by_node(entry_dicts(ledger.entries()))
    pseudonyms = [entries[0]["node"] for entries in local]  # the same secret pseudonym in both runs
    assert sorted(by_node) == sorted(pseudonyms)
    for pseudonym, entries in zip(pseudonyms, local, strict=True):
        assert by_node[pseudonym] == [entries[0], entries[2]]
    audit = ledger.verify_all()
    assert {(finding.node, finding.round) for finding in audit.findings} == {(p, 2) for p in pseudonyms}
    assert all("does not continue this node's previous entry" in finding.problem for finding in audit.findings)


# ---------------------------------------------------------------- d. secure aggregation, a site killed mid-protocol


def test_secure_aggregation_over_tls_survives_a_site_killed_after_sharing_keys(tmp_path):
    from fedtower.config import RunSettings
    from tests.secagg_utils import (
        files_holding,
        independent_secure_epsilon,
        item_tower,
        raw_byte_needles,
        recorded_inputs,
        table_slices,
        unmasked_table_sum,  # fmt: skip
    )

    # Prepare: three sites, t = 2 (a majority). Site 2 takes part in setup and key sharing, then hangs at
    # the masked-input stage until its SuperNode is SIGKILLed with everything under it.
    run_name, victim = "secagg", "supernode-2"
    sites = prepare_sites(DATA, 3, tmp_path / "sites")
    for site in sites:
        site.extra_node_config["test-only-secagg-record"] = True
    sites[2].extra_node_config["test-only-secagg-stall"] = 3
    config = dp_config(tmp_path / "runs", run_name, 1, nodes=3, **{
        "secure-aggregation": True, "dp-federation-users": 120, "dp-batch-size": 24, "secagg-scale": 1024,
        "fraction-evaluate": 0.0, "round-timeout": 45.0})  # fmt: skip
    settings = RunSettings.from_run_config(config)
    run_path = tmp_path / "runs" / run_name
    stalled = sites[2].state_dir / "secagg-stalled"

    with local_deployment(tmp_path / "flower", sites, secure=True) as deployment:
        run = deployment.start_run(REPO_ROOT, config)
        # Execute: kill the victim once it holds the others' shares and hangs before masking.
        deployment.wait(stalled.exists, RUN_TIMEOUT_S, "site 2 to reach the masked-input stage")
        killed = deployment.kill(victim)
        run_id, log = deployment.wait_run(run, RUN_TIMEOUT_S)
        status = deployment.run_status(run_id)

    # Assert: the run completed its round without the victim, and the sum the coordinator stepped with
    # (read back from the released towers) is exactly what the two survivors put under their masks.
    assert killed and status == "finished:completed", log
    assert stalled.read_text().split() == ["masked-input", "1"]
    assert recorded_inputs(sites[2].state_dir, 1) is None
    inputs = [recorded_inputs(site.state_dir, 1) for site in sites[:2]]
    before, after = item_tower(run_path, settings, 0), item_tower(run_path, settings, 1)
    recovered = unmasked_table_sum(before, after, settings)
    expected = table_slices(inputs[0].astype(np.int64) + inputs[1], before)
    for key, total in expected.items():
        np.testing.assert_allclose(recovered[key], total, atol=0.05, rtol=0)
    # Nothing the coordinator stored (run directory) or logged holds a site's input.
    needles = [n for vector in inputs for n in raw_byte_needles(vector)]
    assert files_holding(run_path, needles) == []
    assert files_holding(tmp_path / "flower" / "logs", needles) == []
    # The survivors charged one federation-wide Skellam step with its trust assumptions; the server's
    # ledger is the sites' own, and the auditor's recomputation agrees.
    ledger = ServerLedger(run_path)
    assert ledger.verify_all().ok
    entries = entry_dicts(ledger.entries())
    assert [(e["round"], e["status"], e["mechanism"]) for e in entries] == [(1, "trained", "skellam")] * 2
    for entry in entries:
        assert entry["trust"].startswith("secure-aggregation") and ">= 2 of 3 sites" in entry["trust"]
        (skellam,) = [h for h in entry["history"] if isinstance(h[0], str)]
        assert skellam[:4] == ["skellam", 1.0, 24 / 120, 1] and skellam[4] == 1024
        assert isclose(entry["epsilon_after"], independent_secure_epsilon(entry["history"], entry["delta"]))
    own = {str(site.state_dir): ClientStateStore(site.state_dir, create=False).read_ledger() for site in sites[:2]}
    report = audit_records(ledger.entries(), site_ledgers=own)
    assert report.ok, report.summary()
    summary = (run_path / "summary.txt").read_text()
    assert "secure aggregation" in summary and "threshold t = 2" in summary and "0 round(s) aborted" in summary
    assert summary.count(" integer units = ") == 3  # each of the two sites that masked, and any t of them
