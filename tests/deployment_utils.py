"""A real Flower deployment on loopback for tests: SuperLink, SuperNodes and the `flwr` CLI.

Every process is started in a session of its own and tracked together with
everything it spawns (Flower's SuperExec, ServerApp and ClientApp processes),
found by walking /proc. `ProcessTracker.stop` ends them all, SIGTERM first and
SIGKILL after a grace period, and reports any survivor. Linux only.

`local_deployment(..., secure=True)` runs the same deployment with TLS and
SuperNode authentication: a CA and server certificate for the SuperLink, one
EC key pair per SuperNode, each public key registered with `flwr supernode
register` before its node starts. `database=True` keeps the SuperLink's state
in a SQLite file, so a restarted SuperLink still knows the registered nodes.
`LocalDeployment.kill` / `restart` crash and restart the SuperLink or a
SuperNode (with everything it started) in the middle of a run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fedtower.client.local import load_node_data
from fedtower.client.node_settings import NodeSettings
from fedtower.client.private_round import calibrate, plan_training
from fedtower.config import RunSettings
from fedtower.data.loaders import load_event_log
from fedtower.data.partition import PartitionConfig, partition_events
from fedtower.data.prepared import prepare_split
from fedtower.data.schema import EVENT_COLUMNS, Dataset
from fedtower.data.sources import resolve_dataset
from fedtower.deployment.keys import create_ca, create_node_keys, create_server_certificate
from fedtower.privacy.accounting import ClientAccountant
from fedtower.privacy.secure_random import DPRandom

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
    # A benchmark samples the trees from a thread while the main thread waits on the run.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start a process in its own session, output to <log_dir>/<name>.log."""
        if name in self.popens:
            raise ValueError(f"A process named {name!r} was already started.")
        with open(self.log_dir / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            popen = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=dict(env or self.env),
                                     start_new_session=True)  # fmt: skip
        with self.lock:  # a sampler thread may be walking the trees
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
        with self.lock:
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

    def tree(self, name: str) -> list[int]:
        """The live process `name` and its live descendants now (parents before children)."""
        with self.lock:
            self.refresh()
            children: dict[int, list[int]] = {}
            for pid, ppid in _all_parents().items():
                children.setdefault(ppid, []).append(pid)
            order, frontier = [], [self.popens[name].pid]
            while frontier:
                pid = frontier.pop(0)
                if pid not in order and self._alive(pid):
                    order.append(pid)
                    frontier.extend(children.get(pid, ()))
            return order

    def kill_tree(self, name: str, sig: signal.Signals = signal.SIGKILL, timeout: float = 30.0) -> list[int]:
        """Send `sig` to process `name` and every descendant at once (a crash, with SIGKILL); wait until
        they are gone. Returns the pids signalled."""
        pids = self.tree(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while any(self._alive(pid) for pid in pids):
            self.popens[name].poll()  # reap it, or it lingers as a zombie (which _alive counts as gone)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {[_describe(p) for p in pids if self._alive(p)]} outlived {sig!r}.")
            time.sleep(0.05)
        self.popens[name].poll()
        return pids

    def alive(self) -> list[int]:
        with self.lock:
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


def write_flower_config(
    flwr_home: Path,
    address: str,
    name: str = CONNECTION,
    *,
    root_certificates: Path | None = None,
    extra: Mapping[str, Mapping[str, object]] | None = None,
) -> Path:
    """$FLWR_HOME/config.toml naming one SuperLink connection (the default), plus `extra` ones.

    Without `root_certificates` the connection is `insecure = true`; with it, the
    `flwr` CLI verifies the SuperLink's certificate against that CA file (an
    absolute path, as flwr 1.41 requires: flwr/cli/typing.py). `extra` maps more
    connection names to their keys, e.g. {"plain": {"address": ..., "insecure": True}}.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    main: dict[str, object] = {"address": address}
    if root_certificates is None:
        main["insecure"] = True
    else:
        main["root-certificates"] = str(Path(root_certificates).resolve())
    lines = ["[superlink]", f'default = "{name}"']
    for conn, keys in {name: main, **dict(extra or {})}.items():
        lines += ["", f"[superlink.{conn}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in keys.items()]
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


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
        """The SuperNode's --node-config: where the site's data and private state live, the public
        population it plans DP with (its number of users, as a real site would declare a rounded
        figure), plaintext state accepted (these tests are not about encryption), plus extras."""
        return {"data-path": str(self.data_path), "state-dir": str(self.state_dir),
                "dp-population-users": len(self.users), "allow-plaintext-state": True,
                **self.extra_node_config}  # fmt: skip


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


def planned_epsilons(config: Mapping[str, object], site: Site, rounds: int) -> list[float]:
    """ε after each of `rounds` DP rounds at `site`, from the client's own planning code on its own data
    (no cap), so a test can set a site's max-epsilon between two rounds' values."""
    settings = RunSettings.from_run_config(dict(config))
    node = NodeSettings.from_node_config({k: v for k, v in site.node_config.items() if k != "max-epsilon"})
    histories = load_node_data(settings, node).split.train
    accountant, saved, epsilons = ClientAccountant(), None, []
    for _ in range(rounds):
        calibration, count = calibrate(settings, node, histories, accountant, saved, DPRandom())
        plan = plan_training(calibration, accountant, count, math.inf)  # no cap
        epsilons.append(plan.epsilon_after)
        accountant.charge(plan.added)
        saved = calibration.to_dict()
    return epsilons


# ---------------------------------------------------------------- TLS and node authentication


@dataclass(frozen=True)
class TlsFiles:
    """A CA, the SuperLink's certificate (SANs for the loopback address) and SuperNode key pairs."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def create(cls, directory: Path, hosts: Sequence[str] = (HOST, "localhost")) -> TlsFiles:
        ca_cert, _ = create_ca(directory / "ca")
        server_cert, server_key = create_server_certificate(directory / "server", ca_dir=directory / "ca",
                                                            hosts=list(hosts))  # fmt: skip
        return cls(directory, ca_cert, server_cert, server_key)

    def node_keys(self, name: str) -> tuple[Path, Path]:
        """(private, public) key files of SuperNode `name`: created on first use, the same pair after."""
        folder = self.directory / "nodes"
        private, public = folder / f"{name}.key", folder / f"{name}.pub"
        if private.exists() and public.exists():
            return private, public
        return create_node_keys(folder, site=name)

    def superlink_args(self) -> list[str]:
        return ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.server_cert),
                "--ssl-keyfile", str(self.server_key), "--enable-supernode-auth"]  # fmt: skip


def superlink_argv(port: int, *, tls: TlsFiles | None = None, database: Path | None = None) -> list[str]:
    """flower-superlink on loopback: `--insecure`, or TLS with SuperNode authentication."""
    argv = [flower_bin("flower-superlink"), *(tls.superlink_args() if tls else ["--insecure"])]
    if database is not None:
        argv += ["--database", str(database)]
    return [*argv, "--host", HOST, "--port", str(port)]


def supernode_argv(
    address: str,
    port: int,
    node_config: Mapping[str, object] | None = None,
    *,
    root_certificates: Path | None = None,
    private_key: Path | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """flower-supernode dialling `address`: TLS when `root_certificates` is given, else `--insecure`;
    authenticated with `private_key` (OpenSSH EC) when given. `port` is the node's own ClientApp API."""
    argv = [flower_bin("flower-supernode"),
            *(["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"])]  # fmt: skip
    if private_key is not None:
        argv += ["--auth-supernode-private-key", str(private_key)]
    argv += ["--superlink", address, "--host", HOST, "--port", str(port)]
    if node_config:
        argv += ["--node-config", toml_pairs(node_config)]
    return [*argv, *extra]


# ---------------------------------------------------------------- deployment


def wait_until(condition, timeout: float, what: str, *, poll: float = 0.25, check=None):
    """Poll `condition()` until it returns something truthy (returned); `check()` runs first each time
    (it raises to fail fast, e.g. when a server died). TimeoutError names `what`."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"Waited {timeout:.0f} s for {what}.")
        time.sleep(poll)


@dataclass
class LocalDeployment:
    """A running SuperLink and SuperNodes, and how to reach them with `flwr`.

    Server processes (the SuperLink and each SuperNode) have a logical name;
    `kill` and `restart` act on its latest incarnation, which the tracker logs as
    `<name>`, then `<name>.restart-1`, ...
    """

    tracker: ProcessTracker
    env: dict[str, str]
    ports: dict[str, int]  # the SuperLink's and each SuperNode's HTTP port, by process name
    connection: str = CONNECTION
    address: str = ""
    tls: TlsFiles | None = None
    node_ids: dict[str, int] = field(default_factory=dict)  # SuperNode name -> registered node id (TLS mode)
    launch: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)  # argv, env by name
    current: dict[str, str] = field(default_factory=dict)  # logical name -> tracker name of the incarnation
    down: set[str] = field(default_factory=set)  # servers killed on purpose and not restarted yet

    # ---- processes

    def popen(self, name: str) -> subprocess.Popen:
        return self.tracker.popens[self.current.get(name, name)]

    def start_server(self, name: str, argv: list[str], env: Mapping[str, str], port: int) -> subprocess.Popen:
        """Start a SuperLink or SuperNode that the deployment watches (it must keep running)."""
        self.launch[name] = (list(argv), dict(env))
        self.ports[name] = port
        self.current[name] = name
        return self.tracker.start(name, argv, env=env)

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> list[int]:
        """Kill server `name` with everything it started (its SuperExec, ServerApp/ClientApp processes)."""
        self.down.add(name)
        return self.tracker.kill_tree(self.current[name], sig)

    def restart(self, name: str, timeout: float = 60.0) -> subprocess.Popen:
        """Start server `name` again, with the same command line, port and environment; return once it
        listens on its port."""
        argv, env = self.launch[name]
        count = sum(1 for tracked in self.tracker.popens if tracked.startswith(f"{name}.restart-")) + 1
        self.current[name] = f"{name}.restart-{count}"
        popen = self.tracker.start(self.current[name], argv, env=env)
        try:
            wait_for_port(self.ports[name], popen, timeout, self.current[name])
        except Exception as err:
            raise RuntimeError(f"{err}\n{self.tracker.log_tail(self.current[name])}") from None
        self.down.discard(name)
        return popen

    def log_of(self, name: str) -> str:
        return (self.tracker.log_dir / f"{name}.log").read_text(errors="replace")

    def check_servers_alive(self, *, listening: bool = True) -> None:
        """Fail at once, with the logs, when the SuperLink or a SuperNode has exited or stopped
        listening (a signalled uvicorn server closes its port, then waits for open streams)."""
        self.tracker.refresh()  # track the ServerApp / ClientApp processes Flower starts
        for name, port in self.ports.items():
            if name in self.down:
                continue
            popen = self.popen(name)
            if popen.poll() is not None or (listening and not port_open(port)):
                state = "is shutting down" if popen.returncode is None else f"exited ({popen.returncode})"
                raise RuntimeError(f"{self.current[name]} {state} while the deployment was in use.\n"
                                   f"{self.tracker.all_logs()}")  # fmt: skip

    def wait(self, condition, timeout: float, what: str, *, poll: float = 0.25, listening: bool = True):
        """wait_until, failing fast (with every log) when a server that should run has died."""
        try:
            return wait_until(condition, timeout, what, poll=poll,
                              check=lambda: self.check_servers_alive(listening=listening))  # fmt: skip
        except TimeoutError as err:
            raise TimeoutError(f"{err}\n{self.tracker.all_logs()}") from None

    # ---- SuperNodes

    def register(self, public_key: Path) -> int:
        """`flwr supernode register KEY CONNECTION`: the node id the SuperLink gives this key."""
        result = _json_output(flwr_cli(self.env, "supernode", "register", str(public_key), self.connection,
                                       "--format", "json"))  # fmt: skip
        if not result.get("success"):
            raise RuntimeError(f"`flwr supernode register {public_key}` failed: {result}")
        return int(result["node-id"])

    def nodes(self) -> dict[int, str]:
        """`flwr supernode ls`: node id -> status (registered, online, offline, ...)."""
        result = _json_output(flwr_cli(self.env, "supernode", "ls", self.connection, "--format", "json"))
        if not result.get("success", True):
            raise RuntimeError(f"`flwr supernode ls` failed: {result}")
        return {int(node["node-id"]): str(node["status"]) for node in result.get("nodes", [])}

    def supernodes_online(self) -> int:
        return sum(status == "online" for status in self.nodes().values())

    def wait_for_supernodes(self, count: int, timeout: float) -> None:
        # listening=False: a SuperNode may still be starting its own API.
        self.wait(lambda: self.supernodes_online() >= count, timeout, f"{count} SuperNodes online", poll=0.5,
                  listening=False)  # fmt: skip

    def wait_for_node_status(self, name: str, status: str, timeout: float, poll: float = 1.0) -> None:
        """Wait until `flwr supernode ls` shows SuperNode `name` (TLS mode: by its registered id) as `status`."""
        node_id = self.node_ids[name]
        self.wait(lambda: self.nodes().get(node_id) == status, timeout, f"{name} (node {node_id}) {status}",
                  poll=poll, listening=False)  # fmt: skip

    def start_supernode(self, name: str, site: Site, port: int) -> subprocess.Popen:
        """Start (and in TLS mode first register) SuperNode `name` for `site`."""
        node_env = flower_env(self.tracker.log_dir.parent / "flwr-home" / name)
        private_key = None
        if self.tls is not None:
            private_key, public_key = self.tls.node_keys(name)
            self.node_ids[name] = self.register(public_key)
        argv = supernode_argv(self.address, port, site.node_config, private_key=private_key,
                              root_certificates=self.tls.ca_cert if self.tls else None)  # fmt: skip
        return self.start_server(name, argv, node_env, port)

    # ---- runs

    def start_run(self, app: Path, run_config: Mapping[str, object], name: str = "flwr-run") -> subprocess.Popen:
        """`flwr run APP CONNECTION --stream --run-config ...` in the background (log: <name>.log)."""
        argv = [flower_bin("flwr"), "run", str(app), self.connection, "--stream",
                "--run-config", toml_pairs(run_config)]  # fmt: skip
        return self.tracker.start(name, argv)

    def run_id(self, name: str = "flwr-run") -> int | None:
        match = re.search(r"Successfully started run (\d+)", self.log_of(name))
        return int(match.group(1)) if match else None

    def wait_run(self, popen: subprocess.Popen, timeout: float, name: str = "flwr-run") -> tuple[int, str]:
        """Wait for a `start_run` to end; (run id, its log). Fails on a non-zero exit."""
        self.wait(lambda: popen.poll() is not None, timeout, f"`flwr run` ({name}) to finish", poll=1.0)
        log, run_id = self.log_of(name), self.run_id(name)
        if popen.returncode != 0 or run_id is None:
            raise RuntimeError(f"`flwr run` failed with code {popen.returncode}.\n{self.tracker.all_logs()}")
        return run_id, log

    def run_app(self, app: Path, run_config: Mapping[str, object], timeout: float,
                name: str = "flwr-run") -> tuple[int, str]:  # fmt: skip
        """`flwr run APP CONNECTION --stream --run-config ...`: waits for the end; (run id, log)."""
        return self.wait_run(self.start_run(app, run_config, name), timeout, name)

    def runs(self) -> dict[int, str]:
        """`flwr ls`: run id -> status, for every run the SuperLink knows."""
        runs = _json_output(flwr_cli(self.env, "ls", self.connection, "--format", "json"))
        return {int(run["run-id"]): str(run["status"]) for run in runs.get("runs", [])}

    def run_status(self, run_id: int) -> str:
        runs = _json_output(
            flwr_cli(self.env, "ls", self.connection, "--run-id", str(run_id), "--format", "json")
        )
        (run,) = runs["runs"]
        return str(run["status"])


@contextmanager
def local_deployment(
    root: Path,
    sites: Sequence[Site],
    *,
    secure: bool = False,
    database: bool = False,
    startup_timeout: float = 60.0,
) -> Iterator[LocalDeployment]:
    """Start a SuperLink and one SuperNode per site (`supernode-<i>`) on loopback.

    `secure=False`: `--insecure` everywhere. `secure=True`: TLS (a fresh CA and
    server certificate under root/tls) and SuperNode authentication; each node's
    key pair is created and its public key registered before the node starts.
    `database` keeps the SuperLink's state in root/superlink.db, so a restart
    keeps registered nodes and runs. Off by default: under load (16 nodes on 2
    cores) flwr 1.41's SQLite state answered Fleet calls with HTTP 500
    "database is locked", losing a reply and a node (notes/deployment-tests.md).

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
    tls = TlsFiles.create(root / "tls") if secure else None
    write_flower_config(flwr_home, address, root_certificates=tls.ca_cert if tls else None)
    env = flower_env(flwr_home)
    tracker = ProcessTracker(log_dir, env)
    with ExitStack() as stack:

        def _teardown() -> None:
            survivors = tracker.stop()
            if survivors:
                raise RuntimeError("Processes outlived the deployment:\n" + "\n".join(survivors))

        stack.callback(_teardown)
        deployment = LocalDeployment(tracker, env, {}, address=address, tls=tls)
        # Fleet, Control and Runtime (ServerApp) APIs share this one HTTP port.
        database_path = root / "superlink.db" if database else None
        argv = superlink_argv(superlink_port, tls=tls, database=database_path)
        superlink = deployment.start_server("superlink", argv, env, superlink_port)
        try:
            wait_for_port(superlink_port, superlink, startup_timeout, "flower-superlink")
        except Exception as err:
            raise RuntimeError(f"{err}\n{tracker.log_tail('superlink')}") from None
        for index, (site, port) in enumerate(zip(sites, node_ports, strict=True)):
            deployment.start_supernode(f"supernode-{index}", site, port)
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
    root: Path,
    sites: Sequence[Site],
    run_config: Mapping[str, object],
    *,
    timeout: float,
    app: Path = REPO_ROOT,
    secure: bool = False,
) -> CompletedRun:
    """Start a deployment for `sites`, run `app` on it to the end, check it completed, stop everything.

    Raises AssertionError, with every process's log, when the run ends in any
    status other than finished:completed.
    """
    started = time.monotonic()
    with local_deployment(root, sites, secure=secure) as deployment:
        ready = time.monotonic()
        run_id, log = deployment.run_app(app, run_config, timeout=timeout)
        status = deployment.run_status(run_id)
        if status != "finished:completed":
            raise AssertionError(f"run {run_id} ended {status}\n{log}\n{deployment.tracker.all_logs()}")
        finished = time.monotonic()
    stopped = time.monotonic()
    return CompletedRun(run_id, log, deployment.tracker.log_dir,
                        {"start": ready - started, "run": finished - ready, "stop": stopped - finished})  # fmt: skip
