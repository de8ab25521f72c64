"""The client's private state store: the source of truth across rounds, runs and restarts.

Flower's Context.state lasts one run, and in deployment every message starts a
fresh process, so a client keeps everything it must remember in a node-local
directory:

    state-dir/
      manifest.json        version, and name/kind/file/sha256 of every component
      users.7.pt           one file per component and generation (torch or JSON)
      accountant.6.json    components not saved in a generation keep their file
      ledger.jsonl         privacy ledger, append-only, outside the manifest
      state.lock           flock target that serialises processes on this node

A save writes new component files under new names, then replaces the manifest
atomically; a crash in between leaves the previous manifest pointing at intact
previous files. Files of the previous generation survive one more save.
Readers check every component against the manifest's sha256. Anything missing
or corrupt is a StateError, never an empty state: an empty state would reset
the privacy accountant and let ε restart from zero.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from fedtower.data.schema import atomic_write_bytes, fsync_dir

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
LEDGER_FILE = "ledger.jsonl"
LOCK_FILE = "state.lock"
MANIFEST_FORMAT = "fedtower-client-state/1"

# How each kind of component is written: torch objects with torch.save (and read
# back with weights_only=True), plain dicts/lists as JSON.
KIND_SUFFIX: dict[str, str] = {"torch": "pt", "json": "json"}

# Known components and their kinds; ClientStateStore(kinds=...) declares more.
COMPONENT_KINDS: dict[str, str] = {
    "users": "torch",  # {"embeddings": Tensor, "user_ids": list[str]}
    "optimizer": "torch",  # optimizer.state_dict()
    "item_tower": "torch",  # latest global item-tower state_dict, for serving
    "accountant": "json",  # DP accountant state
    "calibration": "json",  # the run's noise multiplier, fixed once per run
    "dp_optimizer": "torch",  # DP optimizer moments (post-processing of noisy gradients)
    "meta": "json",  # counters: rounds_trained, last_round, run_id, ...
}

# Losing these after training would silently reset ε or the users' embeddings.
REQUIRED_WHEN_TRAINED: tuple[str, ...] = ("users", "accountant")

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_COMPONENT_FILE = re.compile(r"(?P<name>[a-z][a-z0-9_]*)\.(?P<version>\d+)\.(?P<suffix>pt|json)")
_TEMP_FILE = re.compile(r"\..+\.tmp")


class StateError(RuntimeError):
    """The client's state is missing, corrupt, inconsistent or locked."""


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


@dataclass(frozen=True)
class _Manifest:
    version: int
    components: dict[str, dict]  # name -> {"file", "kind", "sha256", "bytes", "version"}

    def files(self) -> set[str]:
        return {entry["file"] for entry in self.components.values()}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class ClientStateStore:
    """Versioned, checksummed, process-safe private state of one client."""

    def __init__(
        self,
        state_dir: str | Path,
        *,
        create: bool = True,
        kinds: Mapping[str, str] | None = None,
        lock_timeout: float = 30.0,
    ):
        self.state_dir = Path(state_dir).expanduser()
        self.lock_timeout = float(lock_timeout)
        self.kinds = dict(COMPONENT_KINDS)
        for name, kind in (kinds or {}).items():
            if not _NAME.fullmatch(name):
                raise ValueError(f"Component name {name!r} must be lower-case letters, digits and '_'.")
            if kind not in KIND_SUFFIX:
                raise ValueError(f"Component {name!r} has kind {kind!r}; kinds are {sorted(KIND_SUFFIX)}.")
            if name in COMPONENT_KINDS and COMPONENT_KINDS[name] != kind:
                raise ValueError(f"Component {name!r} is built in with kind {COMPONENT_KINDS[name]!r}.")
            self.kinds[name] = kind
        self._open_dir(create)

    def _open_dir(self, create: bool) -> None:
        path = self.state_dir
        if path.exists() and not path.is_dir():
            raise StateError(f"State dir {path} exists but is not a directory.")
        if path.is_dir():
            return
        if not create:
            raise StateError(f"State dir {path} does not exist, and the store was opened with create=False.")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:  # another process created it first
            return
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask

    # ---- paths and locking -------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.state_dir / MANIFEST_FILE

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / LEDGER_FILE

    @contextmanager
    def _lock(self, *, exclusive: bool) -> Iterator[None]:
        """flock on state.lock: one writer or many readers across processes on this node."""
        lock_path = self.state_dir / LOCK_FILE
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise StateError(f"Cannot open the lock file {lock_path} of state dir {self.state_dir}: {err}.")
        try:
            operation = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, operation)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StateError(
                            f"Timed out after {self.lock_timeout:g} s waiting for the lock {lock_path} "
                            f"of state dir {self.state_dir}; another process is using this state."
                        ) from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    # ---- manifest ----------------------------------------------------------

    def _read_manifest(self) -> _Manifest | None:
        """The current manifest, or None for a state that was never saved. Call under the lock."""
        try:
            raw = self.manifest_path.read_bytes()
        except FileNotFoundError:
            self._refuse_lost_manifest()
            return None
        except OSError as err:
            raise StateError(
                f"Manifest {self.manifest_path} of state dir {self.state_dir} is unreadable: {err}."
            )
        try:
            return self._parse_manifest(raw)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise StateError(
                f"Manifest {self.manifest_path} of state dir {self.state_dir} is corrupt: {err}. "
                "Restore the state dir from a backup; the client will not start from empty state."
            ) from None

    def _parse_manifest(self, raw: bytes) -> _Manifest:
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ValueError("it is not a JSON object")
        checksum = body.pop("checksum")
        if checksum != _sha256(_canonical_json(body)):
            raise ValueError("checksum mismatch over its own contents")
        if body["format"] != MANIFEST_FORMAT:
            raise ValueError(f"format {body['format']!r} is not {MANIFEST_FORMAT!r}")
        version = body["version"]
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"version {version!r} is not a positive integer")
        components = body["components"]
        for name, entry in components.items():
            match = _COMPONENT_FILE.fullmatch(entry["file"])
            suffix = KIND_SUFFIX.get(entry["kind"])
            if match is None or match["name"] != name or match["suffix"] != suffix:
                raise ValueError(f"component {name!r} names an unexpected file {entry['file']!r}")
            if not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
                raise ValueError(f"component {name!r} has no valid sha256")
        return _Manifest(version=version, components=components)

    def _refuse_lost_manifest(self) -> None:
        """No manifest: fine for a new state dir, or for an interrupted first save (version 1 only).

        Component files of a later generation mean the manifest was lost; starting
        fresh would silently reset the accountant, so refuse.
        """
        later = sorted(
            entry.name
            for entry in self.state_dir.iterdir()
            if (match := _COMPONENT_FILE.fullmatch(entry.name)) and int(match["version"]) > 1
        )
        if later:
            raise StateError(
                f"State dir {self.state_dir} holds component files ({', '.join(later[:5])}) but no "
                f"{MANIFEST_FILE}: the manifest was lost, so this state cannot be trusted. Refusing to "
                "start from empty state; restore the manifest or move the directory aside."
            )

    def _replace_manifest(self, version: int, components: dict[str, dict]) -> None:
        body = {
            "format": MANIFEST_FORMAT,
            "version": version,
            "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "components": components,
        }
        body["checksum"] = _sha256(_canonical_json(body))
        atomic_write_bytes(self.manifest_path, json.dumps(body, sort_keys=True, indent=2).encode())

    # ---- components --------------------------------------------------------

    def _serialise(self, name: str, obj: object) -> tuple[str, bytes]:
        kind = self.kinds.get(name)
        if kind is None:
            raise ValueError(
                f"Unknown state component {name!r}; known components are {sorted(self.kinds)}. "
                "Declare new ones with ClientStateStore(..., kinds={name: 'torch' or 'json'})."
            )
        if kind == "json":
            try:
                return kind, json.dumps(obj, sort_keys=True).encode()
            except (TypeError, ValueError) as err:
                raise ValueError(f"Component {name!r} is declared JSON but is not JSON-serialisable: {err}")
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        data = buffer.getvalue()
        # Fail now, not at the next load: a state that saves but cannot load is a silent reset.
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except Exception as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"Component {name!r} must load with torch.load(weights_only=True) (tensors, dicts, lists, "
                f"numbers, strings), but it does not: {first_line}"
            ) from None
        return kind, data

    def _read_component(self, name: str, entry: dict, map_location: str | torch.device | None) -> object:
        """Read, verify and decode one component. Call under the lock."""
        path = self.state_dir / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as err:
            raise StateError(
                f"Component {name!r} of state dir {self.state_dir} is missing or unreadable: "
                f"{path.name} ({err.strerror or err})."
            ) from None
        actual = _sha256(data)
        if actual != entry["sha256"]:
            raise StateError(
                f"Component {name!r} of state dir {self.state_dir} is corrupt: checksum mismatch in "
                f"{path.name} (manifest sha256 {entry['sha256'][:12]}…, file sha256 {actual[:12]}…)."
            )
        try:
            if entry["kind"] == "json":
                return json.loads(data)
            return torch.load(io.BytesIO(data), weights_only=True, map_location=map_location)
        except Exception as err:
            raise StateError(
                f"Component {name!r} of state dir {self.state_dir} could not be decoded from {path.name}: "
                f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}."
            ) from None

    def save(self, components: Mapping[str, object]) -> int:
        """Save some components as one new generation; others keep their current files.

        Returns the new version. Either every given component is saved or none is.
        """
        if not components:
            raise ValueError("save() needs at least one component.")
        payloads = {name: self._serialise(name, obj) for name, obj in components.items()}
        with self._lock(exclusive=True):
            return self._commit(payloads)

    def _commit(self, payloads: dict[str, tuple[str, bytes]]) -> int:
        previous = self._read_manifest()
        version = (previous.version if previous else 0) + 1
        entries = dict(previous.components) if previous else {}
        for name, (kind, data) in payloads.items():
            file_name = f"{name}.{version}.{KIND_SUFFIX[kind]}"
            atomic_write_bytes(self.state_dir / file_name, data)
            entries[name] = {
                "file": file_name,
                "kind": kind,
                "sha256": _sha256(data),
                "bytes": len(data),
                "version": version,
            }
        fsync_dir(self.state_dir)
        self._replace_manifest(version, entries)  # the commit point
        fsync_dir(self.state_dir)
        keep = {e["file"] for e in entries.values()} | (previous.files() if previous else set())
        self._collect_garbage(keep)
        return version

    def _collect_garbage(self, keep: set[str]) -> None:
        """Delete component files older than the previous generation, and crashed temp files.

        Safe under the exclusive lock: no other writer is mid-write.
        """
        for entry in self.state_dir.iterdir():
            stale_component = _COMPONENT_FILE.fullmatch(entry.name) and entry.name not in keep
            if stale_component or _TEMP_FILE.fullmatch(entry.name):
                entry.unlink(missing_ok=True)

    def load_many(
        self,
        names: Iterable[str],
        default: object = MISSING,
        *,
        map_location: str | torch.device | None = "cpu",
    ) -> dict[str, object]:
        """Several components from one generation (a concurrent save cannot split them)."""
        with self._lock(exclusive=False):
            manifest = self._read_manifest()
            components = manifest.components if manifest else {}
            loaded: dict[str, object] = {}
            for name in names:
                if name in components:
                    loaded[name] = self._read_component(name, components[name], map_location)
                elif default is not MISSING:
                    loaded[name] = default
                else:
                    raise StateError(
                        f"State dir {self.state_dir} has no component {name!r} "
                        f"(it has {sorted(components) or 'none'})."
                    )
            return loaded

    def load(
        self, name: str, default: object = MISSING, *, map_location: str | torch.device | None = "cpu"
    ) -> object:
        """One component; a missing one returns `default`, or raises StateError without one."""
        return self.load_many([name], default, map_location=map_location)[name]

    def has(self, name: str) -> bool:
        with self._lock(exclusive=False):
            manifest = self._read_manifest()
        return manifest is not None and name in manifest.components

    @property
    def version(self) -> int:
        """Version of the current generation; 0 before the first save."""
        with self._lock(exclusive=False):
            manifest = self._read_manifest()
        return manifest.version if manifest else 0

    def exists_initialised(self) -> bool:
        """True once a save has completed (the state dir has a manifest)."""
        return self.manifest_path.is_file()

    def meta(self) -> dict:
        """The counters component (rounds_trained, last_round, run_id, ...); {} before the first save."""
        with self._lock(exclusive=False):
            return self._read_meta(self._read_manifest())

    def _read_meta(self, manifest: _Manifest | None) -> dict:
        entry = manifest.components.get("meta") if manifest else None
        meta = self._read_component("meta", entry, None) if entry else {}
        if not isinstance(meta, dict):
            raise StateError(f"Component 'meta' of state dir {self.state_dir} is not a JSON object.")
        return meta

    def update_meta(self, **fields: object) -> dict:
        """Merge `fields` into meta as one atomic read-modify-write; returns the new meta."""
        with self._lock(exclusive=True):
            meta = self._read_meta(self._read_manifest())
            meta.update(fields)
            self._commit({"meta": self._serialise("meta", meta)})
        return meta

    def verify(self) -> int:
        """Check every component against its checksum; returns the verified version."""
        with self._lock(exclusive=False):
            manifest = self._read_manifest()
            if manifest is None:
                return 0
            for name, entry in manifest.components.items():
                self._read_component(name, entry, "cpu")
            return manifest.version

    def assert_consistent(
        self, expect_trained: bool, required: Iterable[str] = REQUIRED_WHEN_TRAINED
    ) -> None:
        """Fail closed before training or serving.

        `expect_trained`: the caller knows this client trained before (e.g. it is
        asked to serve), so an empty state is an error too. Whenever meta says the
        client trained, every `required` component must be present, and every
        component must match its checksum.
        """
        with self._lock(exclusive=False):
            manifest = self._read_manifest()
            if manifest is None:
                if expect_trained:
                    raise StateError(
                        f"State dir {self.state_dir} has no {MANIFEST_FILE}, but this client is expected to "
                        "have trained before; refusing to continue from empty state."
                    )
                return
            meta = self._read_meta(manifest)
            rounds_trained = meta.get("rounds_trained", 0)
            if not isinstance(rounds_trained, int) or rounds_trained < 0:
                raise StateError(
                    f"Component 'meta' of state dir {self.state_dir} has an invalid rounds_trained "
                    f"{rounds_trained!r}; it must be a non-negative integer."
                )
            if expect_trained and rounds_trained == 0:
                raise StateError(
                    f"State dir {self.state_dir} says this client never trained (rounds_trained=0), "
                    "but it is expected to have trained before."
                )
            if rounds_trained > 0:
                missing = [name for name in required if name not in manifest.components]
                if missing:
                    raise StateError(
                        f"State dir {self.state_dir} says this client trained {rounds_trained} round(s) "
                        f"but has no {', '.join(repr(m) for m in missing)} component; refusing to continue, "
                        "since starting these afresh would reset the client's privacy accounting or users."
                    )
            for name, component in manifest.components.items():
                self._read_component(name, component, "cpu")

    # ---- privacy ledger ----------------------------------------------------

    def append_ledger(self, entry: Mapping[str, object]) -> None:
        """Append one JSON line and fsync it before returning.

        A final line without its newline is a write that never completed (its
        append never returned), so it is cut off before the next entry is added.
        """
        if not isinstance(entry, Mapping):
            raise TypeError(f"A ledger entry must be a dict, not {type(entry).__name__}.")
        try:
            line = json.dumps(dict(entry), sort_keys=True, separators=(",", ":"), allow_nan=False)
        except ValueError as err:  # auditors read the ledger with any JSON parser: no NaN/Infinity
            raise ValueError(f"A ledger entry must be strict JSON (no NaN or Infinity): {err}.") from None
        data = (line + "\n").encode()
        with self._lock(exclusive=True):
            created = not self.ledger_path.exists()
            fd = os.open(self.ledger_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                self._cut_unfinished_ledger_line(fd)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.state_dir)

    def _cut_unfinished_ledger_line(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        end = size
        while end > 0:  # scan backwards for the last complete line
            start = max(0, end - 4096)
            newline = os.pread(fd, end - start, start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        log.warning(
            "Ledger %s ended with an unfinished line (%d bytes) from an interrupted append; cutting it off.",
            self.ledger_path,
            size - end,
        )
        os.ftruncate(fd, end)

    def read_ledger(self) -> list[dict]:
        """Every complete ledger entry, in order; an unfinished final line is reported and skipped."""
        with self._lock(exclusive=False):
            try:
                data = self.ledger_path.read_bytes()
            except FileNotFoundError:
                return []
            except OSError as err:
                raise StateError(
                    f"Ledger {self.ledger_path} of state dir {self.state_dir} is unreadable: {err}."
                )
        *lines, unfinished = data.split(b"\n")
        entries = []
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict):
                raise StateError(
                    f"Ledger {self.ledger_path} of state dir {self.state_dir} is corrupt: line {number} "
                    "is not a JSON object."
                )
            entries.append(entry)
        if unfinished:
            log.warning(
                "Ledger %s ends with an unfinished line (%d bytes) from an interrupted append; skipping it.",
                self.ledger_path,
                len(unfinished),
            )
        return entries
