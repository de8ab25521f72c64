"""A real Flower deployment on loopback for tests: SuperLink, SuperNodes and the `flwr` CLI.

Every process is started in a session of its own and tracked together with
everything it spawns (Flower's SuperExec, ServerApp and ClientApp processes),
found by walking /proc. `ProcessTracker.stop` ends them all, SIGTERM first and
SIGKILL after a grace period, and reports any survivor. Linux only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fedtower.data.loaders import load_event_log
from fedtower.data.prepared import prepare_split
from fedtower.data.schema import EVENT_COLUMNS, Dataset
from fedtower.data.sources import resolve_dataset
from fedtower.simulations.partition import PartitionConfig, partition_events

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr live beside python
CONNECTION = "fedtower-test"
HOST = "127.0.0.1"


# ---------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parens
    return fields[0], int(fields[1]), int(fields[19])


def _all_parents() -> dict[int, int]:
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None:
                parents[int(entry.name)] = stat[1]
    return parents


@dataclass
class ProcessTracker:
    """The processes a test started, and every descendant seen while they ran."""

    log_dir: Path
    env: dict[str, str]
    popens: dict[str, subprocess.Popen] = field(default_factory=dict)
    # pid -> start time, so a recycled pid is never signalled by mistake.
    seen: dict[int, int] = field(default_factory=dict)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start a process in its own session, output to <log_dir>/<name>.log."""
        if name in self.popens:
            raise ValueError(f"A process named {name!r} was already started.")
        with open(self.log_dir / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            popen = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=dict(env or self.env),
                                     start_new_session=True)  # fmt: skip
        self.popens[name] = popen
        self.refresh()
        return popen

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"----- {name}.log (last {chars} chars) -----\n{text[-chars:]}"

    def all_logs(self, chars: int = 3000) -> str:
        return "\n".join(self.log_tail(name, chars) for name in self.popens)

    def _alive(self, pid: int) -> bool:
        stat = _proc_stat(pid)
        # A zombie has exited; only its parent's wait() is missing.
        return stat is not None and stat[2] == self.seen.get(pid, stat[2]) and stat[0] not in ("Z", "X")

    def refresh(self) -> None:
        """Record every live descendant of the tracked processes (call it while they run).

        Descendants are remembered, so one that outlives its parent (and is
        re-parented away from the tree) is still stopped at the end.
        """
        children: dict[int, list[int]] = {}
        for pid, ppid in _all_parents().items():
            children.setdefault(ppid, []).append(pid)
        for popen in self.popens.values():
            stat = _proc_stat(popen.pid)
            if popen.pid not in self.seen and stat is not None:
                self.seen[popen.pid] = stat[2]
        frontier = [pid for pid in self.seen if self._alive(pid)]
        visited: set[int] = set()
        while frontier:
            pid = frontier.pop()
            if pid in visited:
                continue
            visited.add(pid)
            for child in children.get(pid, ()):
                stat = _proc_stat(child)
                if stat is not None:
                    self.seen[child] = stat[2]
                    frontier.append(child)

    def alive(self) -> list[int]:
        for popen in self.popens.values():
            popen.poll()  # reap our own children so they do not linger as zombies
        return sorted(pid for pid in self.seen if self._alive(pid))

    def _signal_all(self, sig: signal.Signals, skip: set[int] | frozenset[int] = frozenset()) -> set[int]:
        signalled = set()
        for pid in self.alive():
            if pid in skip:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
                os.kill(pid, sig)
                signalled.add(pid)
        return signalled

    def stop(self, grace: float = 10.0) -> list[str]:
        """SIGTERM everything, SIGKILL what is left after `grace` seconds; returns survivors."""
        self.refresh()
        terminated = self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.refresh()  # a process may still spawn children while it shuts down: stop those too
            terminated |= self._signal_all(signal.SIGTERM, skip=terminated)
            if not self.alive():
                break
            time.sleep(0.2)
        for _ in range(3):
            self.refresh()
            if not self.alive():
                break
            self._signal_all(signal.SIGKILL)
            time.sleep(0.5)
        for popen in self.popens.values():
            with contextlib.suppress(subprocess.TimeoutExpired):  # reported below as a survivor
                popen.wait(timeout=5)
        return [_describe(pid) for pid in self.alive()]


def _describe(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmd = "?"
    return f"{pid}: {cmd.strip()}"


# ---------------------------------------------------------------- helpers


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def toml_pairs(values: Mapping[str, object]) -> str:
    """`k1=v1 k2="v2"` as Flower's --run-config / --node-config parse them."""
    parts = []
    for key, value in values.items():
        if isinstance(value, str):
            if '"' in value or "\\" in value:
                raise ValueError(f"Flower's key=value parser cannot take {value!r} (quote or backslash).")
            text = f'"{value}"'
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            raise TypeError(f"{key}: unsupported value {value!r}")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process: isolated FLWR_HOME, no telemetry, no installs."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",  # loopback only: no version check against flower.ai
        # Read when the SuperLink starts: run the app in this venv, never `uv sync` a new one.
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}",  # SuperLink/SuperNode spawn flower-superexec
        PYTHONUNBUFFERED="1",
    )
    return env


def write_flower_config(flwr_home: Path, address: str, name: str = CONNECTION) -> Path:
    """$FLWR_HOME/config.toml naming one insecure SuperLink connection (the default)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\ninsecure = true\n'
    )
    return path


def flower_bin(name: str) -> str:
    path = BIN_DIR / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed next to {sys.executable} nor on PATH.")
    return found


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def wait_for_port(port: int, popen: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"{what} exited with code {popen.returncode} before listening on {port}.")
        if port_open(port):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on {HOST}:{port} within {timeout:.0f} s.")


def flwr_cli(env: Mapping[str, str], *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """One short `flwr` command (killed by subprocess.run on timeout)."""
    return subprocess.run([flower_bin("flwr"), *args], env=dict(env), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip


def _json_output(result: subprocess.CompletedProcess) -> dict:
    start = result.stdout.find("{")
    if result.returncode != 0 or start < 0:
        raise RuntimeError(f"`flwr` failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout[start:])


# ---------------------------------------------------------------- data


@dataclass
class Site:
    data_path: Path  # folder holding events.csv
    state_dir: Path
    users: set[str]  # users with any event on this site
    users_with_test: int  # users the site evaluates (at least one held-out interaction)
    # More node config for this site's SuperNode (e.g. its own `max-epsilon`); set before deploying.
    extra_node_config: dict[str, object] = field(default_factory=dict)

    @property
    def node_config(self) -> dict[str, object]:
        """The SuperNode's --node-config: where the site's data and private state live, plus extras."""
        return {"data-path": str(self.data_path), "state-dir": str(self.state_dir), **self.extra_node_config}


def prepare_sites(data_spec: str, num_sites: int, root: Path, *, seed: int = 0) -> list[Site]:
    """Split a dataset's users into site folders of events.csv, plus an empty state dir each.

    The catalogue stays out of the site folders: it is public and every party
    derives it from the run config's `data` spec.
    """
    dataset, _ = resolve_dataset(data_spec)
    config = PartitionConfig(scheme="sites", num_partitions=num_sites, seed=seed)
    sites = []
    for site_id in range(num_sites):
        part = partition_events(dataset, config, site_id)
        data_path = root / f"site-{site_id}"
        state_dir = root / f"state-{site_id}"
        data_path.mkdir(parents=True)
        state_dir.mkdir(parents=True)
        part.events[list(EVENT_COLUMNS)].to_csv(data_path / "events.csv", index=False)
        # Count evaluated users the way the client will: from the file, through the same split.
        events, _ = load_event_log(data_path, catalogue=dataset.catalogue, on_error="skip")
        split = prepare_split(Dataset(dataset.catalogue, events, name=str(data_path)))
        sites.append(Site(data_path, state_dir, set(part.events["user"].astype(str)),
                          int((split.test.lengths() > 0).sum())))  # fmt: skip
    return sites


# ---------------------------------------------------------------- deployment


@dataclass
class LocalDeployment:
    """A running SuperLink and SuperNodes, and how to reach them with `flwr`."""

    tracker: ProcessTracker
    env: dict[str, str]
    ports: dict[str, int]  # the SuperLink's and each SuperNode's HTTP port, by process name
    connection: str = CONNECTION

    def check_servers_alive(self, *, listening: bool = True) -> None:
        """Fail at once, with the logs, when the SuperLink or a SuperNode has exited or stopped
        listening (a signalled uvicorn server closes its port, then waits for open streams)."""
        for name, port in self.ports.items():
            popen = self.tracker.popens[name]
            if popen.poll() is not None or (listening and not port_open(port)):
                state = "is shutting down" if popen.returncode is None else f"exited ({popen.returncode})"
                raise RuntimeError(f"{name} {state} while the deployment was in use.\n"
                                   f"{self.tracker.all_logs()}")  # fmt: skip

    def supernodes_online(self) -> int:
        nodes = _json_output(flwr_cli(self.env, "supernode", "ls", self.connection, "--format", "json"))
        return sum(node.get("status") == "online" for node in nodes.get("nodes", []))

    def wait_for_supernodes(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        online = 0
        while time.monotonic() < deadline:
            self.check_servers_alive(listening=False)  # a SuperNode may still be starting
            online = self.supernodes_online()
            if online >= count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"Only {online} of {count} SuperNodes came online within {timeout:.0f} s.")

    def run_app(self, app: Path, run_config: Mapping[str, object], timeout: float) -> tuple[int, str]:
        """`flwr run APP CONNECTION --stream --run-config ...`: waits for the end; (run id, log)."""
        argv = [flower_bin("flwr"), "run", str(app), self.connection, "--stream",
                "--run-config", toml_pairs(run_config)]  # fmt: skip
        popen = self.tracker.start("flwr-run", argv)
        deadline = time.monotonic() + timeout
        while popen.poll() is None:
            self.check_servers_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"`flwr run` did not finish within {timeout:.0f} s.\n{self.tracker.all_logs()}"
                )
            self.tracker.refresh()  # track the ServerApp / ClientApp processes Flower starts
            time.sleep(1.0)
        log = (self.tracker.log_dir / "flwr-run.log").read_text(errors="replace")
        match = re.search(r"Successfully started run (\d+)", log)
        if popen.returncode != 0 or match is None:
            raise RuntimeError(f"`flwr run` failed with code {popen.returncode}.\n{self.tracker.all_logs()}")
        return int(match.group(1)), log

    def run_status(self, run_id: int) -> str:
        runs = _json_output(
            flwr_cli(self.env, "ls", self.connection, "--run-id", str(run_id), "--format", "json")
        )
        (run,) = runs["runs"]
        return str(run["status"])


@contextmanager
def local_deployment(
    root: Path, sites: Sequence[Site], *, startup_timeout: float = 60.0
) -> Iterator[LocalDeployment]:
    """Start `flower-superlink --insecure` and one `flower-supernode --insecure` per site on loopback.

    Whatever happens, every process started here (and everything they
    started) is stopped on exit; a survivor fails the test.
    """
    # One FLWR_HOME per party, as on separate machines: each installs the app bundle itself.
    # The SuperLink's is also the CLI's (config.toml with the connection).
    flwr_home = root / "flwr-home" / "superlink"
    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    superlink_port, *node_ports = free_ports(1 + len(sites))
    address = f"{HOST}:{superlink_port}"
    write_flower_config(flwr_home, address)
    env = flower_env(flwr_home)
    tracker = ProcessTracker(log_dir, env)
    with ExitStack() as stack:

        def _teardown() -> None:
            survivors = tracker.stop()
            if survivors:
                raise RuntimeError("Processes outlived the deployment:\n" + "\n".join(survivors))

        stack.callback(_teardown)
        # Fleet, Control and Runtime (ServerApp) APIs share this one HTTP port.
        superlink = tracker.start("superlink", [flower_bin("flower-superlink"), "--insecure",
                                                "--host", HOST, "--port", str(superlink_port)])  # fmt: skip
        try:
            wait_for_port(superlink_port, superlink, startup_timeout, "flower-superlink")
        except Exception as err:
            raise RuntimeError(f"{err}\n{tracker.log_tail('superlink')}") from None
        for index, (site, port) in enumerate(zip(sites, node_ports, strict=True)):
            node_config = toml_pairs(site.node_config)
            node_env = flower_env(root / "flwr-home" / f"supernode-{index}")
            tracker.start(f"supernode-{index}", [
                flower_bin("flower-supernode"), "--insecure", "--superlink", address,
                "--host", HOST, "--port", str(port),  # this node's own ClientApp Runtime API
                "--node-config", node_config,
            ], env=node_env)  # fmt: skip
        ports = {"superlink": superlink_port, **{f"supernode-{i}": p for i, p in enumerate(node_ports)}}
        deployment = LocalDeployment(tracker, env, ports)
        deployment.wait_for_supernodes(len(sites), startup_timeout)
        yield deployment


@dataclass
class CompletedRun:
    """A `flwr run` that finished with status completed, on a deployment that has been stopped."""

    run_id: int
    log: str  # `flwr run --stream` output
    log_dir: Path  # every process's log, kept after the deployment stopped
    seconds: dict[str, float]  # "start" (deployment up), "run" (`flwr run` and status), "stop"

    def timings(self) -> str:
        return ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.seconds.items())


def run_to_completion(
    root: Path, sites: Sequence[Site], run_config: Mapping[str, object], *, timeout: float, app: Path = REPO_ROOT
) -> CompletedRun:
    """Start a deployment for `sites`, run `app` on it to the end, check it completed, stop everything.

    Raises AssertionError, with every process's log, when the run ends in any
    status other than finished:completed.
    """
    started = time.monotonic()
    with local_deployment(root, sites) as deployment:
        ready = time.monotonic()
        run_id, log = deployment.run_app(app, run_config, timeout=timeout)
        status = deployment.run_status(run_id)
        if status != "finished:completed":
            raise AssertionError(f"run {run_id} ended {status}\n{log}\n{deployment.tracker.all_logs()}")
        finished = time.monotonic()
    stopped = time.monotonic()
    return CompletedRun(run_id, log, deployment.tracker.log_dir,
                        {"start": ready - started, "run": finished - ready, "stop": stopped - finished})  # fmt: skip
