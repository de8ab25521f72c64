"""`fedtower local-superlink stop` stops the SuperLink that `flwr run` started for this FLWR_HOME, and
nothing else: not a deployment's SuperLink on the same machine, not another FLWR_HOME's."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedtower.local_superlink import local_superlinks, stop_local_superlinks
from tests.deployment_utils import free_ports, superlink_argv, wait_for_port

pytestmark = [pytest.mark.deployment, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")]

START_LOCAL = "from flwr.cli.local_superlink import _start_local_superlink; _start_local_superlink()"


def with_flower_on_path() -> dict:
    """Flower starts `flower-superlink` and `flower-superexec` from PATH: the ones beside this Python."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "FLWR_TELEMETRY_ENABLED": "0"}


def start_flowers_local_superlink(home, ports) -> None:
    """Flower's own code path for `flwr run` against a local federation, with this test's ports and home."""
    env = {**with_flower_on_path(), "FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(ports[0]),
           "FLWR_LOCAL_CONTROL_API_PORT": str(ports[1])}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", START_LOCAL], env=env, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_stop_ends_only_the_local_superlink_of_this_flwr_home(tmp_path, monkeypatch):
    # Prepare: this home's local SuperLink, another home's, and a deployment's SuperLink.
    mine, other = tmp_path / "mine", tmp_path / "other"
    ports = free_ports(5)
    deployment = None
    try:
        start_flowers_local_superlink(mine, ports[0:2])
        start_flowers_local_superlink(other, ports[2:4])
        deployment = subprocess.Popen(superlink_argv(ports[4], database=tmp_path / "link.db"),
                                      env=with_flower_on_path(), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        wait_for_port(ports[4], deployment, 60, "the deployment's SuperLink")
        monkeypatch.setenv("FLWR_HOME", str(mine))
        assert len(local_superlinks()) == 1 and len(local_superlinks(other)) == 1
        theirs = local_superlinks(other)

        # Execute
        stopped = stop_local_superlinks()

        # Assert: this home's SuperLink is gone; the other home's and the deployment's still run.
        assert stopped and local_superlinks() == []
        assert local_superlinks(other) == theirs
        assert deployment.poll() is None
    finally:  # nothing of this test is left running, whatever failed
        stop_local_superlinks(mine)
        stop_local_superlinks(other)
        if deployment is not None:
            deployment.send_signal(signal.SIGTERM)
            deployment.wait(timeout=30)


def test_status_and_stop_say_so_when_nothing_runs(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fedtower.cli import app

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "empty"))
    for command in ("status", "stop"):
        result = CliRunner().invoke(app, ["local-superlink", command])
        assert result.exit_code == 0 and "No local SuperLink is running" in result.output
