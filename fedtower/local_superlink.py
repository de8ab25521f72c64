"""The SuperLink that `flwr run` starts on this machine for a local simulation, found and stopped alone.

flwr 1.42 starts it detached (`flower-superlink --simulation ... --log-file
$FLWR_HOME/local-superlink/superlink.log`) and writes no pid file, so it is found by that log file
in its command line: no other SuperLink (a deployment's, another user's FLWR_HOME) matches it.
Stopping sends SIGTERM to it and to the processes it started (its SuperExec and ClientApps).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def flower_home() -> Path:
    return Path(os.environ["FLWR_HOME"]) if os.environ.get("FLWR_HOME") else Path.home() / ".flwr"


def local_log_file(home: Path | None = None) -> Path:
    return (home or flower_home()) / "local-superlink" / "superlink.log"


def process_table() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, argv) of every process we may read."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        found[int(entry.name)] = (parent, argv)
    return found


def local_superlinks(home: Path | None = None, processes: dict[int, tuple[int, list[str]]] | None = None) -> list[int]:
    """Pids of the SuperLinks `flwr run` started for this FLWR_HOME (`processes`: a /proc read to reuse)."""
    log_file = str(local_log_file(home))
    pids = []
    for pid, (_, argv) in (processes if processes is not None else process_table()).items():
        if any(Path(a).name == "flower-superlink" for a in argv[:2]) and "--log-file" in argv:
            at = argv.index("--log-file")
            if at + 1 < len(argv) and argv[at + 1] == log_file:
                pids.append(pid)
    return sorted(pids)


def _descendants(root: int, processes: dict[int, tuple[int, list[str]]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    order, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        for child in children.get(pid, []):
            order.append(child)
            frontier.append(child)
    return order


def stop_local_superlinks(home: Path | None = None, *, timeout: float = 15.0) -> list[int]:
    """SIGTERM each local SuperLink and what it started; SIGKILL what is left after `timeout`. Returns
    the pids that were signalled."""
    processes = process_table()
    targets = []
    for pid in local_superlinks(home, processes):
        targets += [*_descendants(pid, processes), pid]
    _signal(targets, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(pid) for pid in targets):
        time.sleep(0.2)
    _signal([pid for pid in targets if _alive(pid)], signal.SIGKILL)
    return targets


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # it exited meanwhile: nothing left to stop
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] not in "ZX"
