"""A long-lived process per site that keeps torch and fedtower loaded between messages.

Flower starts a fresh `flwr-clientapp` process for every message (flwr 1.42 has
no reuse), and each one would import torch, pandas and fedtower again: about
3 CPU-seconds before any work, which is most of a round when 24 SuperNodes share
two cores. With node config `site-worker = true` the ClientApp stays thin: it
forwards the message and its context over a Unix socket to this site's worker
(started on first use) which runs the very same handlers and answers with the
reply. Nothing else changes: the private state is read from and written to the
state dir per message exactly as without a worker, DP noise comes from the OS
per round, and the worker holds only imports and the public catalogue between
messages.

Who may talk to it: the socket lives in a directory only this OS user can
enter (created 0700, its owner and mode checked on every use), the socket is
0600, and the worker answers only peers of its own uid (SO_PEERCRED). A process
of that uid can already read the state dir, so the worker exposes nothing new.

Lifetime: the worker exits when its SuperNode (or the SuperExec that started
the ClientApp) is gone, or after `site-worker-idle-seconds` without a message;
the next message starts a new one. A worker that dies before it acknowledged a
message is restarted and the message resent; after the acknowledgement the
message fails with the worker's log named (it may have trained: never run twice).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtower.client.node_settings import NodeSettings

log = logging.getLogger("fedtower.client")

PROTOCOL = 1
ACK = b"\x06"
HANDLERS = {"train": "train_on_node", "evaluate": "evaluate_on_node"}
START_TIMEOUT = 120.0  # seconds a new worker may take to import torch and listen, on a busy machine
WATCH_PERIOD = 2.0  # how often the worker checks that its SuperNode is still there
WATCHED = ("flower-supernode", "flower-superexec")
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes on Linux, with its terminating NUL


class SiteWorkerError(RuntimeError):
    """The site worker could not be reached, or died while handling a message."""


# ------------------------------------------------------------------ where the socket lives


def runtime_dir() -> Path:
    """This user's private directory for worker sockets: created 0700, refused if anyone else could enter."""
    path = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"fedtower-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise SiteWorkerError(
            f"{path} must be a directory owned by uid {os.getuid()} with mode 0700 (it holds the site worker's "
            f"socket), but it is mode {stat.filemode(info.st_mode)} owned by uid {info.st_uid}. Remove it, or "
            "set site-worker = false in the node config."
        )
    return path


def code_root() -> Path:
    """The directory the running fedtower was imported from (a FAB's copy under flwr, or the install)."""
    import fedtower

    return Path(fedtower.__file__).resolve().parents[1]


def socket_path(node: NodeSettings) -> Path:
    """One worker per (state dir, fedtower code, Python): a changed install or FAB gets a new worker."""
    from fedtower import __version__

    key = json.dumps([str(node.state_dir.resolve()), str(code_root()), __version__, sys.executable, PROTOCOL])
    path = runtime_dir() / f"worker-{hashlib.sha256(key.encode()).hexdigest()[:20]}.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise SiteWorkerError(f"The site worker's socket path {path} is longer than a Unix socket allows "
                              f"({MAX_SOCKET_PATH} bytes); point XDG_RUNTIME_DIR at a shorter directory.")  # fmt: skip
    return path


# ------------------------------------------------------------------ framing


def _send(sock: socket.socket, *parts: bytes) -> None:
    for part in parts:
        sock.sendall(struct.pack(">Q", len(part)))
        if part:  # an empty part is its length alone: a reader that has it all may already have closed
            sock.sendall(part)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> bytes:
    (size,) = struct.unpack(">Q", _recv_exact(sock, 8))
    return _recv_exact(sock, size)


# ------------------------------------------------------------------ the ClientApp's side


def run_message(kind: str, message: Message, context: Context) -> Message:
    """The ClientApp's work for one message: in this process, or in the site's worker when the node asks."""
    node = NodeSettings.from_node_config(context.node_config)
    if not node.site_worker:
        from fedtower.client import handlers

        return getattr(handlers, HANDLERS[kind])(message, context)
    reply_content, state, records = call_worker(node, kind, message, context)
    for level, name, text in records:  # the worker's log lines, shown where this ClientApp's would be
        logging.getLogger(name).log(level, "%s", text)
    context.state = state
    return Message(content=reply_content, reply_to=message)


def call_worker(node: NodeSettings, kind: str, message: Message, context: Context):
    """(reply content, context state, log records) from the site's worker, starting it if needed."""
    path = socket_path(node)
    request = (
        json.dumps({"protocol": PROTOCOL, "kind": kind, "task": _task_identity()}).encode(),
        message_to_proto(message).SerializeToString(),
        context_to_proto(context).SerializeToString(),
    )
    for attempt in range(2):
        sock = _connect(path) or _start_worker(node, path)
        with sock:
            try:
                _send(sock, *request)
                acknowledged = _recv_exact(sock, 1) == ACK
            except (ConnectionError, OSError):
                acknowledged = False
            if not acknowledged:  # the worker went away before it took the message: safe to resend
                log.warning("The site worker at %s did not take the message (attempt %d); starting a new one.",
                            path, attempt + 1)  # fmt: skip
                continue
            try:
                header = json.loads(_recv(sock))
                parts = [_recv(sock) for _ in range(header.get("parts", 0))]
            except (ConnectionError, OSError) as err:
                raise SiteWorkerError(
                    f"The site worker died while handling a {kind} message ({err}); its log is {_log_path(path)}. "
                    "The message is not resent: it may have trained."
                ) from err
        if not header["ok"]:
            raise _rebuilt_error(header)
        content = recorddict_from_proto(ProtoRecordDict.FromString(parts[0]))
        state = recorddict_from_proto(ProtoRecordDict.FromString(parts[1]))
        return content, state, header["logs"]
    raise SiteWorkerError(f"No site worker would take the {kind} message at {path}; see {_log_path(path)}.")


def worker_pid(node: NodeSettings) -> int | None:
    """The pid of the site's running worker (from the socket's peer credentials), or None."""
    sock = _connect(socket_path(node))
    if sock is None:
        return None
    with sock:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]


def _task_identity() -> list[int | None]:
    """Flower stamps messages with the task running them: the worker runs the message as this task."""
    return [TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id]


def _rebuilt_error(header: dict) -> Exception:
    """The worker's exception with its own class name and message, so Flower reports it as if raised here."""
    cls = type(header["type"], (RuntimeError,), {"__module__": header["module"], "__qualname__": header["type"]})
    return cls(header["error"])


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:
        sock.close()
        return None


def _log_path(path: Path) -> Path:
    return path.with_suffix(".log")


def _start_worker(node: NodeSettings, path: Path) -> socket.socket:
    """Start the worker (one at a time per socket, under a lock) and connect to it."""
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)  # another ClientApp may have started it while we waited
        if sock is not None:
            return sock
        path.unlink(missing_ok=True)  # a stale socket of a worker that died
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code_root()), env.get("PYTHONPATH")]))
        argv = [sys.executable, "-m", "fedtower.client.site_worker", "--socket", str(path),
                "--state-dir", str(node.state_dir), "--idle-seconds", str(node.site_worker_idle_seconds)]  # fmt: skip
        watched = _watched_ancestor()
        if watched is not None:
            argv += ["--watch-pid", str(watched[0]), "--watch-start", str(watched[1])]
        with open(_log_path(path), "ab") as out:
            os.chmod(out.name, 0o600)
            popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                     start_new_session=True, close_fds=True)  # fmt: skip
        log.info("Started the site worker (pid %d) for state dir %s.", popen.pid, node.state_dir)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            sock = _connect(path)
            if sock is not None:
                return sock
            if popen.poll() is not None:
                break
            time.sleep(0.05)
        popen.kill()
        last = _log_path(path).read_text(errors="replace").strip().splitlines()[-1:] or ["(empty)"]
        raise SiteWorkerError(
            f"The site worker for state dir {node.state_dir} did not start (exit {popen.poll()}: {last[0]}); its log "
            f"is {_log_path(path)}. Set site-worker = false in the node config to run each message in its own process."
        )


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks (tells a pid apart from a later process that reuses it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _watched_ancestor() -> tuple[int, int] | None:
    """(pid, start time) of the nearest SuperNode or SuperExec above this process, on Linux."""
    pid = os.getppid()
    for _ in range(16):
        if pid <= 1:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        if any(name in cmdline for name in WATCHED):
            start = _process_start(pid)
            return (pid, start) if start is not None else None
        pid = parent
    return None


# ------------------------------------------------------------------ the worker's side


def peer_allowed(peer_uid: int, own_uid: int) -> bool:
    return peer_uid == own_uid


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class _Capture(logging.Handler):
    """Keeps the records of one message, to be shown by the ClientApp that sent it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[int, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.name, record.getMessage()))


@contextmanager
def _captured_logs() -> Iterator[list]:
    capture = _Capture()
    ours = logging.getLogger("fedtower")
    ours.addHandler(capture)
    try:
        yield capture.records
    finally:
        ours.removeHandler(capture)


def handle(conn: socket.socket, handlers: dict[str, Callable[[Message, Context], Message]]) -> None:
    header = json.loads(_recv(conn))
    message_bytes, context_bytes = _recv(conn), _recv(conn)
    if header.get("protocol") != PROTOCOL or header.get("kind") not in handlers:
        raise SiteWorkerError(f"Unexpected request {header!r}")
    conn.sendall(ACK)
    began = time.perf_counter()
    message = message_from_proto(ProtoMessage.FromString(message_bytes))
    context = context_from_proto(ProtoContext.FromString(context_bytes))
    parts: list[bytes] = []
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = header.get("task") or (None, None, None)
    with _captured_logs() as records:
        try:
            reply = handlers[header["kind"]](message, context)
            parts = [recorddict_to_proto(reply.content).SerializeToString(),
                     recorddict_to_proto(context.state).SerializeToString()]  # fmt: skip
            answer = {"ok": True}
        except Exception as err:  # noqa: BLE001 - every failure goes back to the ClientApp, which raises it
            answer = {"ok": False, "module": type(err).__module__, "type": type(err).__qualname__, "error": str(err)}
            print(traceback.format_exc(), file=sys.stderr, flush=True)
    try:
        _send(conn, json.dumps({**answer, "parts": len(parts), "logs": records}).encode(), *parts)
    except OSError as err:  # not a probe: this message was handled, and its ClientApp has left
        print(f"{time.strftime('%H:%M:%S')} site worker {os.getpid()}: {header['kind']} message handled, but "
              f"its ClientApp left before the reply was sent ({err})", file=sys.stderr, flush=True)  # fmt: skip
        return
    outcome = "answered" if answer["ok"] else "failed"
    print(f"{time.strftime('%H:%M:%S')} site worker {os.getpid()}: {header['kind']} message {outcome} "
          f"in {time.perf_counter() - began:.2f} s", file=sys.stderr, flush=True)  # fmt: skip


def serve(path: Path, *, idle_seconds: float, watch: tuple[int, int] | None = None) -> None:
    """Answer messages on `path` until idle for `idle_seconds` or the watched process is gone."""
    from fedtower.client import handlers as handler_module  # the imports this process exists to keep

    handlers = {kind: getattr(handler_module, name) for kind, name in HANDLERS.items()}
    ours = logging.getLogger("fedtower")
    ours.setLevel(logging.INFO)
    ours.propagate = False  # records go back to the ClientApp that sent the message, and to this log
    to_log = logging.StreamHandler(sys.stderr)
    to_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours.handlers[:] = [to_log]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        path.unlink(missing_ok=True)
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(16)
    listener.settimeout(WATCH_PERIOD)
    print(f"site worker {os.getpid()} listening on {path}", file=sys.stderr, flush=True)
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_seconds:
            if watch is not None and _process_start(watch[0]) != watch[1]:
                print(f"site worker {os.getpid()}: process {watch[0]} is gone; exiting", file=sys.stderr, flush=True)
                return
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                if not peer_allowed(_peer_uid(conn), os.getuid()):
                    print("site worker: refused a peer of another uid", file=sys.stderr, flush=True)
                    continue
                try:
                    handle(conn, handlers)
                except ConnectionError:
                    pass  # a probe (`worker_pid`) or a ClientApp killed before it sent its message
                except (OSError, SiteWorkerError, ValueError) as err:
                    print(f"site worker: dropped a request: {err}", file=sys.stderr, flush=True)
            last = time.monotonic()
        print(f"site worker {os.getpid()}: idle for {idle_seconds:g} s; exiting", file=sys.stderr, flush=True)
    finally:
        # Unlink before closing: a ClientApp arriving now finds no socket and starts a new worker.
        path.unlink(missing_ok=True)
        listener.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fedtower's site worker (started by the ClientApp).")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--state-dir", help="the site it serves (shown by ps; the state dir comes per message)")
    parser.add_argument("--idle-seconds", type=float, default=600.0)
    parser.add_argument("--watch-pid", type=int)
    parser.add_argument("--watch-start", type=int)
    args = parser.parse_args(argv)
    watch = (args.watch_pid, args.watch_start) if args.watch_pid is not None else None
    serve(args.socket, idle_seconds=args.idle_seconds, watch=watch)


if __name__ == "__main__":
    main()
