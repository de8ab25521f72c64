"""The site worker: a long-lived process per site that the thin ClientApp forwards messages to.

It must answer exactly what the ClientApp would answer by itself, be reachable by
no other OS user, restart when it died, and go away with its SuperNode or when idle.
"""

import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedtower.client import site_worker
from fedtower.client.local import _files_fingerprint
from fedtower.client.node_settings import NodeSettings
from fedtower.client.site_worker import SiteWorkerError, run_message, socket_path, worker_pid
from fedtower.config import RunSettings
from fedtower.server.federation import initial_item_tower
from tests.deployment_utils import prepare_sites
from tests.flower_utils import node_context, server_message, task_identity

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_PEERCRED and /proc are Linux's")

DATA = "synthetic:users=60,items=80,seed=3"


@pytest.fixture()
def runtime(tmp_path, monkeypatch):
    """A private runtime dir for this test's sockets; every worker started in it is killed at the end."""
    short = Path(tempfile.mkdtemp(prefix="ftw-"))  # a socket path must fit in 107 bytes; tmp_path may not
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short))
    started: list[NodeSettings] = []
    yield started
    for node in started:
        pid = worker_pid(node)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(short, ignore_errors=True)


def deployed_site(tmp_path, name: str, *, worker: bool, idle: float = 60.0, **extra) -> dict:
    site = prepare_sites(DATA, 2, tmp_path / name)[0]
    config = {**site.node_config, "torch-threads": 1, **extra}
    if worker:
        config.update({"site-worker": True, "site-worker-idle-seconds": idle})
    return config


def worker_site(tmp_path, runtime, *, idle: float = 60.0, **extra) -> tuple[dict, NodeSettings]:
    """A deployed site served by a worker (killed at the end of the test): (node config, its settings)."""
    config = deployed_site(tmp_path, "a", worker=True, idle=idle, **extra)
    node = NodeSettings.from_node_config(config)
    runtime.append(node)
    return config, node


def run_settings(tmp_path) -> RunSettings:
    return RunSettings(data=DATA, num_sites=2, dim=8, local_epochs=1, output_dir=str(tmp_path / "runs"),
                       run_name="w", history_len=20)  # fmt: skip


def send(kind: str, node_config: dict, settings: RunSettings, *, server_round: int = 1, tower=None):
    tower = tower if tower is not None else initial_item_tower(settings)
    context = node_context(node_config, settings.to_run_config(), node_id=4)
    with task_identity(node_id=4):
        message = server_message(tower, node_id=4, message_type=kind, server_round=server_round)
        return run_message(kind, message, context)


def test_the_worker_answers_exactly_what_the_clientapp_answers_by_itself(tmp_path, runtime):
    # Prepare: the same site twice, one served by a worker and one in this process.
    settings = run_settings(tmp_path)
    with_worker = deployed_site(tmp_path, "a", worker=True)
    in_process = deployed_site(tmp_path, "b", worker=False)
    runtime.append(NodeSettings.from_node_config(with_worker))
    tower = initial_item_tower(settings)
    # Execute: two rounds of train then evaluate on each.
    replies = {}
    for name, config in (("worker", with_worker), ("local", in_process)):
        received = tower
        for server_round in (1, 2):
            trained = send("train", config, settings, server_round=server_round, tower=received)
            evaluated = send("evaluate", config, settings, server_round=server_round, tower=trained.content["arrays"])
            received = trained.content["arrays"]
        replies[name] = (trained, evaluated)
    # Assert: the same trained tower bit for bit (training without DP is seeded from the run config on purpose),
    # the same metrics, and the reply addressed to the message it answers.
    (w_train, w_eval), (l_train, l_eval) = replies["worker"], replies["local"]
    assert set(w_train.content["arrays"]) == set(l_train.content["arrays"])
    for key in l_train.content["arrays"]:
        np.testing.assert_array_equal(w_train.content["arrays"][key].numpy(), l_train.content["arrays"][key].numpy())
    assert dict(w_eval.content["metrics"]) == dict(l_eval.content["metrics"])
    assert dict(w_train.content["metrics"])["train-loss"] == dict(l_train.content["metrics"])["train-loss"]
    assert w_train.metadata.message_type == "train" and w_eval.metadata.message_type == "evaluate"
    assert w_train.metadata.dst_node_id == 4


def test_later_messages_reuse_the_worker_and_its_socket_is_private(tmp_path, runtime):
    # Prepare
    settings = run_settings(tmp_path)
    config, node = worker_site(tmp_path, runtime)
    # Execute
    send("train", config, settings)
    first = worker_pid(node)
    send("evaluate", config, settings)
    # Assert: one worker, not this process; socket 0600 in a 0700 directory of this user.
    assert first is not None and first != os.getpid()
    assert worker_pid(node) == first
    path = socket_path(node)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and path.parent.stat().st_uid == os.getuid()
    assert "listening" in path.with_suffix(".log").read_text()


def test_the_workers_log_lines_show_in_the_clientapp(tmp_path, runtime, caplog):
    settings = run_settings(tmp_path)
    config, _ = worker_site(tmp_path, runtime)
    (tmp_path / "a" / "site-0" / "events.csv").open("a").write("u-new,no-such-item,click,1,1.0\n")  # reported, kept out
    with caplog.at_level(logging.WARNING, logger="fedtower"):
        send("train", config, settings)
    assert any("Local data validation" in r.getMessage() for r in caplog.records), caplog.text


def test_a_refusal_in_the_worker_is_raised_with_its_own_name_and_message(tmp_path, runtime):
    # Prepare: a site that capped its epsilon, in a run without DP.
    settings = run_settings(tmp_path)
    config, _ = worker_site(tmp_path, runtime, **{"max-epsilon": 4.0})
    # Execute / Assert: the same class name, module and text as in process (Flower reports str(type) and text).
    with pytest.raises(RuntimeError, match="max-epsilon = 4.0") as raised:
        send("train", config, settings)
    assert type(raised.value).__name__ == "BudgetRefusal"
    assert type(raised.value).__module__ == "fedtower.client.handlers"


def test_a_killed_worker_is_replaced_by_the_next_message(tmp_path, runtime):
    settings = run_settings(tmp_path)
    config, node = worker_site(tmp_path, runtime)
    send("train", config, settings)
    first = worker_pid(node)
    os.kill(first, signal.SIGKILL)  # leaves its socket file behind
    time.sleep(0.2)
    # Execute
    reply = send("evaluate", config, settings)
    # Assert
    assert reply.content["metrics"]["users"] > 0
    assert worker_pid(node) not in (None, first)


def test_an_idle_worker_exits_and_removes_its_socket(tmp_path, runtime):
    settings = run_settings(tmp_path)
    config, node = worker_site(tmp_path, runtime, idle=1.0)
    send("evaluate", config, settings)
    pid = worker_pid(node)
    assert pid is not None
    deadline = time.monotonic() + 20
    while (socket_path(node).exists() or _alive(pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not socket_path(node).exists()
    assert not _alive(pid)


def test_a_worker_exits_when_the_process_it_watches_is_gone(tmp_path, runtime):
    # Prepare: a stand-in for the SuperNode, and a worker told to watch it.
    sleeper = subprocess.Popen(["sleep", "60"])
    path = site_worker.runtime_dir() / "watch-test.sock"
    worker = subprocess.Popen([sys.executable, "-m", "fedtower.client.site_worker", "--socket", str(path),
                               "--watch-pid", str(sleeper.pid),
                               "--watch-start", str(site_worker._process_start(sleeper.pid))])  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert path.exists() and worker.poll() is None
        # Execute
        sleeper.kill()
        sleeper.wait()
        # Assert: gone within a few watch periods, its socket with it.
        assert worker.wait(timeout=5 * site_worker.WATCH_PERIOD + 5) == 0
        assert not path.exists()
    finally:
        worker.kill()
        sleeper.kill()


def test_two_identical_sites_get_independent_dp_noise_from_long_lived_workers(tmp_path, runtime):
    # Prepare: the attack a coordinator would try on a process that lives across messages: it knows the
    # run config, the seed and both sites' (identical) data and state, and compares what the two send.
    settings = replace(run_settings(tmp_path), noise_multiplier=1.0, dp_batch_size=8)
    first = deployed_site(tmp_path, "a", worker=True)
    second = deployed_site(tmp_path, "b", worker=True)
    runtime.extend(NodeSettings.from_node_config(c) for c in (first, second))
    tower = initial_item_tower(settings)
    # Execute: the same DP round twice at each site's worker (second round reuses the warm process).
    replies = [[send("train", config, settings, server_round=r, tower=tower).content["arrays"] for r in (1, 2)]
               for config in (first, second)]  # fmt: skip
    # Assert: no two releases share their noise, within a worker or across workers.
    released = [np.concatenate([a[k].numpy().ravel() for k in sorted(a)]) for site in replies for a in site]
    for i in range(len(released)):
        for j in range(i + 1, len(released)):
            assert not np.allclose(released[i], released[j]), (i, j)


def test_a_runtime_dir_others_could_enter_is_refused_naming_it(tmp_path, runtime):
    settings = run_settings(tmp_path)
    config = deployed_site(tmp_path, "a", worker=True)
    shared = Path(os.environ["XDG_RUNTIME_DIR"]) / f"fedtower-{os.getuid()}"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(SiteWorkerError, match=f"{shared}.*mode 0700"):
        send("train", config, settings)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as another user")
def test_another_user_cannot_reach_the_workers_socket(tmp_path, runtime):
    # Prepare: a running worker.
    settings = run_settings(tmp_path)
    config, node = worker_site(tmp_path, runtime)
    send("evaluate", config, settings)
    path = socket_path(node)
    # Execute: connect as uid 65534 (nobody).
    probe = ("import os, socket; os.setgid(65534); os.setuid(65534); s = socket.socket(socket.AF_UNIX); "
             f"s.connect({str(path)!r}); print('connected')")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    # Assert
    assert result.returncode != 0 and "connected" not in result.stdout
    assert "PermissionError" in result.stderr
    assert site_worker.peer_allowed(65534, 0) is False and site_worker.peer_allowed(0, 0) is True


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"site-worker": True, "partition-id": 0}, "applies to a deployed node"),
        ({"site-worker": True, "state-dir": "/tmp/x", "test-only-secagg-stall": 2}, "cannot be combined"),
        ({"site-worker": "yes", "state-dir": "/tmp/x"}, "'site-worker' must be true or false"),
        ({"site-worker-idle-seconds": 0, "state-dir": "/tmp/x"}, "'site-worker-idle-seconds' must be positive"),
    ],
)
def test_bad_worker_settings_are_refused_naming_the_key(config, problem):
    with pytest.raises(ValueError, match=problem):
        NodeSettings.from_node_config(config)


def test_a_socket_path_too_long_for_unix_is_refused_naming_it(tmp_path, monkeypatch):
    long_dir = tmp_path / ("d" * 90)
    long_dir.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(long_dir))
    node = NodeSettings.from_node_config({"state-dir": str(tmp_path), "site-worker": True})
    with pytest.raises(SiteWorkerError, match="longer than a Unix socket allows.*XDG_RUNTIME_DIR"):
        socket_path(node)


def test_the_catalogue_cache_sees_a_changed_file(tmp_path):
    # A worker outlives runs: a catalogue updated between them must be read again.
    source = tmp_path / "catalogue"
    source.mkdir()
    shutil.copy(__file__, source / "items.csv")
    before = _files_fingerprint(str(source))
    (source / "items.csv").open("a").write("one more row\n")
    assert _files_fingerprint(str(source)) != before
    assert _files_fingerprint("synthetic:users=5") == ()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_a_reply_ending_in_an_empty_part_ends_with_the_write_the_reader_waits_for():
    # Prepare: a socket that records its writes, on a real socket pair. A reader that holds every part
    # closes at once (the ClientApp does), so a write after the last byte it needs would hit a closed pipe.
    import socket

    from fedtower.client.site_worker import _recv, _send

    class RecordingSocket:
        def __init__(self, sock):
            self.sock, self.writes = sock, []

        def sendall(self, data):
            self.writes.append(len(data))
            self.sock.sendall(data)

    sender, reader = socket.socketpair()
    recording = RecordingSocket(sender)

    # Execute: a reply whose context state is empty.
    _send(recording, b"header", b"content", b"")
    parts = [_recv(reader) for _ in range(3)]

    # Assert: the parts arrive intact, and no write is empty (the last one is the empty part's length).
    assert parts == [b"header", b"content", b""]
    assert 0 not in recording.writes and recording.writes[-1] == 8
    sender.close()
    reader.close()
