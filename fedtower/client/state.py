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

With a state key (see state_crypto), the store is encrypted at rest: every
component file and every log line is AES-GCM ciphertext whose associated data
names the store, the component (or log) and its generation, the manifest
carries an HMAC, and the logs live in `ledger.e<epoch>.jsonl` for the key
epoch the manifest names. A store that was encrypted is never read or written
in plaintext, and a keyed client refuses a plaintext store (`fedtower state
encrypt` converts one). `rekey()` re-encrypts everything under a new key as
one new generation, committed by the manifest replace like any other save.

The append-only logs (ledger, events) and StateError live in state_logs.py.
"""

from __future__ import annotations

import collections
import fcntl
import io
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from fedtower.client.state_crypto import (
    SCHEME,
    AuthenticationFailed,
    StateCipher,
    StateKey,
    StateKeyError,
    resolve_state_key,
)
from fedtower.client.state_logs import LOG_NAMES, AppendOnlyLogs, StateError, _log_aad, _sha256
from fedtower.data.schema import atomic_write_bytes, fsync_dir

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
LEDGER_FILE = "ledger.jsonl"
LOCK_FILE = "state.lock"
ROUND_LOCK_FILE = "round.lock"  # one privacy round at a time (see round_lock)
MANIFEST_FORMAT = "fedtower-client-state/1"

# How each kind of component is written: torch objects with torch.save (and read
# back with weights_only=True), plain dicts/lists as JSON.
KIND_SUFFIX: dict[str, str] = {"torch": "pt", "json": "json"}

# Known components and their kinds; ClientStateStore(kinds=...) declares more.
COMPONENT_KINDS: dict[str, str] = {
    "users": "torch",  # {"embeddings": Tensor, "user_ids": list[str]}
    "dp_users": "torch",  # the same, as interaction-level DP-SGD left it (serving never writes it)
    "ledger_key": "json",  # the node's own Ed25519 ledger signing key, when node config names none
    "optimizer": "torch",  # optimizer.state_dict()
    "item_tower": "torch",  # latest global item-tower state_dict, for serving
    "accountant": "json",  # DP accountant state
    "calibration": "json",  # the run's noise multiplier, fixed once per run
    "dp_optimizer": "torch",  # DP optimizer moments (post-processing of noisy gradients)
    "meta": "json",  # counters: rounds_trained, last_round, run_id, ...
    "secagg": "json",  # this round's secure-aggregation secrets (keys, received shares), never sent
    "local_items": "json",  # items added to the served catalogue on this node (fedtower.serving.items)
}

# Append-only logs kept next to the components (outside the manifest's generations).

# Losing these after training would silently reset ε or the users' embeddings.
REQUIRED_WHEN_TRAINED: tuple[str, ...] = ("users", "accountant")

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_COMPONENT_FILE = re.compile(r"(?P<name>[a-z][a-z0-9_]*)\.(?P<version>\d+)\.(?P<suffix>pt|json)")
_TEMP_FILE = re.compile(r"\..+\.tmp")
_PLAIN_LOG_FILE = re.compile(r"(?P<name>[a-z][a-z0-9_]*)\.jsonl")
_SEALED_LOG_FILE = re.compile(r"(?P<name>[a-z][a-z0-9_]*)\.e(?P<epoch>\d+)\.jsonl")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


class _FromEnvironment:
    def __repr__(self) -> str:
        return "KEY_FROM_ENVIRONMENT"


# Default for ClientStateStore(key=...): the key in FEDTOWER_STATE_KEY(_FILE), if any.
KEY_FROM_ENVIRONMENT = _FromEnvironment()


@dataclass(frozen=True)
class _Manifest:
    version: int
    components: dict[str, dict]  # name -> {"file", "kind", "sha256", "bytes", "version"}
    encryption: dict | None = None  # {"scheme", "key_id", "store_id", "epoch"}; None: plaintext

    def files(self) -> set[str]:
        return {entry["file"] for entry in self.components.values()}

    def log_file(self, name: str) -> str:
        if self.encryption is None:
            return f"{name}.jsonl"
        return f"{name}.e{self.encryption['epoch']}.jsonl"


def _canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class ClientStateStore(AppendOnlyLogs):
    """Versioned, checksummed, process-safe private state of one client."""

    def __init__(
        self,
        state_dir: str | Path,
        *,
        create: bool = True,
        kinds: Mapping[str, str] | None = None,
        lock_timeout: float = 30.0,
        key: StateKey | None | _FromEnvironment = KEY_FROM_ENVIRONMENT,
        durable: bool = True,
    ):
        """`key`: the site's state key; by default the one in the environment, None for no key.

        `durable=False` (a simulation's own stores) skips fsync on generations: a generation stays
        atomic (the manifest rename is the commit point), but a power loss may lose the last one.
        The privacy ledger and event logs are always fsynced."""
        self.state_dir = Path(state_dir).expanduser()
        self.durable = bool(durable)
        self.lock_timeout = float(lock_timeout)
        if key is KEY_FROM_ENVIRONMENT:
            try:
                key = resolve_state_key()
            except StateKeyError as err:
                raise StateError(f"State dir {self.state_dir}: {err}") from None
        self._cipher: StateCipher | None = key.cipher() if key is not None else None
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

    @classmethod
    def for_node(cls, state_dir: str | Path, node_config: Mapping[str, object] | object | None, *,
                 create: bool = False, durable: bool = True) -> ClientStateStore:  # fmt: skip
        """The node's store with the node's key: node config `state-key-file`, else the
        environment (FEDTOWER_STATE_KEY(_FILE)); an unusable key is a StateError naming the dir.

        `node_config`: the raw mapping, or the node's `NodeSettings`."""
        if node_config is not None and not isinstance(node_config, Mapping):  # NodeSettings
            key_file = node_config.state_key_file
            node_config = {"state-key-file": str(key_file)} if key_file is not None else {}
        try:
            key = resolve_state_key(node_config)
        except StateKeyError as err:
            raise StateError(f"The node's state key for {state_dir} cannot be used: {err}") from None
        return cls(state_dir, create=create, key=key, durable=durable)

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
        return self.log_path("ledger")

    def log_path(self, name: str) -> Path:
        """Where log `name` lives now (its file name depends on the key epoch when encrypted)."""
        with self._lock(exclusive=False):
            return self.state_dir / self._log_file(name, self._read_manifest())

    @property
    def encrypted(self) -> bool:
        """Whether the saved state is encrypted (a new store is, when a key is configured)."""
        with self._lock(exclusive=False):
            manifest = self._read_manifest()
        return manifest.encryption is not None if manifest else self._cipher is not None

    @property
    def key_id(self) -> str | None:
        """Public id of the key this store was opened with; None without a key."""
        return self._cipher.key_id if self._cipher else None

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

    @contextmanager
    def round_lock(self, timeout: float) -> Iterator[None]:
        """Exclusive for one privacy round at a time on this node, across processes and runs.

        Held from the budget check until the accountant is saved: two rounds that each read the
        accountant, trained and saved would lose one round's spend. A second round waits up to
        `timeout` seconds, then is refused.
        """
        lock_path = self.state_dir / ROUND_LOCK_FILE
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StateError(
                            f"Another round has been training on this node (state dir {self.state_dir}) for "
                            f"more than {timeout:g} s; refusing this one rather than run two at once "
                            "(node config train-lock-timeout sets the wait)."
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

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
        mac = body.pop("mac", None)
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
        encryption = body.get("encryption")
        if encryption is not None:
            if encryption.get("scheme") != SCHEME or not isinstance(encryption.get("epoch"), int):
                raise ValueError(f"its encryption block {encryption!r} is not {SCHEME} with an integer epoch")
            self._check_key(encryption, body, mac)
        elif self._cipher is not None:
            raise StateError(
                f"State dir {self.state_dir} is not encrypted ({MANIFEST_FILE} has no encryption block), but "
                f"a state key (id {self._cipher.key_id}) is configured. Refusing to read or write it in "
                f"plaintext: encrypt it once with `fedtower state encrypt --state-dir {self.state_dir} "
                "--key-file KEYFILE`, or remove the key from the configuration."
            )
        return _Manifest(version=version, components=components, encryption=encryption)

    def _check_key(self, encryption: dict, body: dict, mac: object) -> None:
        """An encrypted manifest needs the right key, and its MAC must verify (no edits, no downgrade)."""
        where = f"State dir {self.state_dir} is encrypted with key id {encryption.get('key_id')}"
        if self._cipher is None:
            raise StateError(
                f"{where}, but no state key is configured; refusing to continue without it. Give the key "
                "file: --state-key-file FILE on a fedtower command, node config state-key-file on a SuperNode, "
                "or FEDTOWER_STATE_KEY_FILE (or FEDTOWER_STATE_KEY) in the environment."
            )
        if self._cipher.key_id != encryption.get("key_id"):
            raise StateError(f"{where}, but the configured key has id {self._cipher.key_id}: wrong key.")
        if not self._cipher.verify_mac(_canonical_json(body), mac):
            raise StateError(
                f"{self.manifest_path} failed authentication with the right key: it was modified or "
                "replaced. Restore the state dir from a backup; the client will not use it."
            )

    def _refuse_lost_manifest(self) -> None:
        """No manifest: fine for a new state dir, or for an interrupted first save (version 1 only).

        Component files of a later generation mean the manifest was lost; starting
        fresh would silently reset the accountant, so refuse.
        """
        later = sorted(
            entry.name
            for entry in self.state_dir.iterdir()
            if ((match := _COMPONENT_FILE.fullmatch(entry.name)) and int(match["version"]) > 1)
            or _SEALED_LOG_FILE.fullmatch(entry.name)  # only an encrypted store that committed has these
            # A ledger line is appended only after a save committed: the manifest existed.
            or (entry.name == LEDGER_FILE and entry.stat().st_size > 0)
        )
        if later:
            raise StateError(
                f"State dir {self.state_dir} holds component files ({', '.join(later[:5])}) but no "
                f"{MANIFEST_FILE}: the manifest was lost, so this state cannot be trusted. Refusing to "
                "start from empty state; restore the manifest or move the directory aside."
            )

    def _replace_manifest(
        self,
        version: int,
        components: dict[str, dict],
        encryption: dict | None = None,
        cipher: StateCipher | None = None,
    ) -> None:
        body = {
            "format": MANIFEST_FORMAT,
            "version": version,
            "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "components": components,
        }
        if encryption is not None:
            body["encryption"] = encryption
        canonical = _canonical_json(body)
        if encryption is not None:
            body["mac"] = (cipher or self._cipher).mac(canonical)
        body["checksum"] = _sha256(canonical)
        atomic_write_bytes(self.manifest_path, json.dumps(body, sort_keys=True, indent=2).encode(),
                           durable=self.durable)  # fmt: skip

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
        if _plain_weights(obj):  # tensors in dicts and lists: loads with weights_only, no need to try
            return kind, data
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

    def _read_component(
        self, name: str, entry: dict, map_location: str | torch.device | None, manifest: _Manifest
    ) -> object:
        """Read, verify, decrypt and decode one component. Call under the lock."""
        return self._decode(name, entry, self._component_bytes(name, entry, manifest), map_location)

    def _component_bytes(self, name: str, entry: dict, manifest: _Manifest) -> bytes:
        """The verified (and decrypted) bytes of one component. Call under the lock."""
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
        if manifest.encryption is None:
            return data
        try:
            return self._cipher.open(data, _component_aad(manifest.encryption, name, entry))
        except AuthenticationFailed:
            raise StateError(
                f"Component {name!r} of state dir {self.state_dir} failed authentication in {path.name}: the "
                "file was encrypted for another component, generation or store (swapped), or tampered with."
            ) from None

    def _decode(self, name: str, entry: dict, data: bytes, map_location) -> object:
        path = self.state_dir / entry["file"]
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
            return self._commit(payloads).version

    def _commit(self, payloads: dict[str, tuple[str, bytes]]) -> _Manifest:
        previous = self._read_manifest()
        version = (previous.version if previous else 0) + 1
        entries = dict(previous.components) if previous else {}
        if previous is not None:
            encryption = previous.encryption
        elif self._cipher is not None:  # a new store with a key configured starts encrypted
            encryption = {"scheme": SCHEME, "key_id": self._cipher.key_id, "store_id": uuid.uuid4().hex,
                          "epoch": 1}  # fmt: skip
        else:
            encryption = None
        for name, (kind, data) in payloads.items():
            entries[name] = self._write_component(name, kind, data, version, encryption, self._cipher)
        self._sync_dir()
        self._replace_manifest(version, entries, encryption)  # the commit point
        self._sync_dir()
        keep = {e["file"] for e in entries.values()} | (previous.files() if previous else set())
        manifest = _Manifest(version=version, components=entries, encryption=encryption)
        self._collect_garbage(keep, keep_logs={manifest.log_file(name) for name in LOG_NAMES})
        return manifest

    def _write_component(
        self, name: str, kind: str, data: bytes, version: int, encryption: dict | None, cipher: StateCipher | None
    ) -> dict:
        """Write one component file of generation `version` (encrypted when the store is); its entry."""
        entry = {"file": f"{name}.{version}.{KIND_SUFFIX[kind]}", "kind": kind, "version": version}
        if encryption is not None:
            data = cipher.seal(data, _component_aad(encryption, name, entry))
        atomic_write_bytes(self.state_dir / entry["file"], data, durable=self.durable)
        return {**entry, "sha256": _sha256(data), "bytes": len(data)}

    def _sync_dir(self) -> None:
        if self.durable:
            fsync_dir(self.state_dir)

    def _collect_garbage(self, keep: set[str], keep_logs: set[str]) -> None:
        """Delete component files not in `keep`, files of our logs not in `keep_logs`, crashed temp files.

        Stale log files are those of another key epoch, or plaintext logs of a
        store that is now encrypted: what a rotation (or a crash in one) leaves.
        Safe under the exclusive lock: no other writer is mid-write.
        """
        for entry in self.state_dir.iterdir():
            stale_component = _COMPONENT_FILE.fullmatch(entry.name) and entry.name not in keep
            log_match = _PLAIN_LOG_FILE.fullmatch(entry.name) or _SEALED_LOG_FILE.fullmatch(entry.name)
            stale_log = log_match and log_match["name"] in LOG_NAMES and entry.name not in keep_logs
            if stale_component or stale_log or _TEMP_FILE.fullmatch(entry.name):
                entry.unlink(missing_ok=True)

    def load_many(
        self,
        names: Iterable[str],
        default: object = MISSING,
        *,
        map_location: str | torch.device | None = "cpu",
    ) -> dict[str, object]:
        """Several components from one generation (a concurrent save cannot split them)."""
        return self.load_versioned(names, default, map_location=map_location)[0]

    def load_versioned(
        self,
        names: Iterable[str],
        default: object = MISSING,
        *,
        map_location: str | torch.device | None = "cpu",
    ) -> tuple[dict[str, object], dict[str, int]]:
        """Like load_many, plus the generation each component was saved in (0 for a missing one)."""
        with self._lock(exclusive=False):
            manifest = self._read_manifest()
            components = manifest.components if manifest else {}
            loaded: dict[str, object] = {}
            versions: dict[str, int] = {}
            for name in names:
                versions[name] = _entry_version(components[name]) if name in components else 0
                if name in components:
                    loaded[name] = self._read_component(name, components[name], map_location, manifest)
                elif default is not MISSING:
                    loaded[name] = default
                else:
                    raise StateError(
                        f"State dir {self.state_dir} has no component {name!r} "
                        f"(it has {sorted(components) or 'none'})."
                    )
            return loaded, versions

    def generations(self) -> dict[str, int]:
        """The generation (manifest version) in which each component was last saved."""
        with self._lock(exclusive=False):
            manifest = self._read_manifest()
        return {name: _entry_version(entry) for name, entry in manifest.components.items()} if manifest else {}

    def manifest_stamp(self) -> tuple[int, int, int] | None:
        """(inode, mtime ns, size) of the manifest; None before the first save.

        Every save replaces the manifest file, so an unchanged stamp means nothing
        was saved: a lock-free check a server can afford once a second.
        """
        try:
            stat = self.manifest_path.stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def update(self, name: str, change: Callable[[object], object]) -> tuple[int, int]:
        """Read-modify-write of one component under the exclusive lock.

        `change(current)` (None when the component is missing) returns what to
        save. No other process can save between the read and the write, so a
        caller that changes only part of a component (e.g. a few user rows) keeps
        what others saved meanwhile. Returns (generation read, 0 when missing;
        the new generation).
        """
        with self._lock(exclusive=True):
            manifest = self._read_manifest()
            entry = manifest.components.get(name) if manifest else None
            current = self._read_component(name, entry, "cpu", manifest) if entry else None
            payload = self._serialise(name, change(current))
            return (_entry_version(entry) if entry else 0), self._commit({name: payload}).version

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
        meta = self._read_component("meta", entry, None, manifest) if entry else {}
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
                self._read_component(name, entry, "cpu", manifest)
            for name in LOG_NAMES:
                self._read_log(name, manifest)
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
                self._read_component(name, component, "cpu", manifest)

    # ---- append-only logs (privacy ledger, local event log) ----------------

    # ---- key rotation -------------------------------------------------------

    def rekey(self, new_key: StateKey) -> int:
        """Re-encrypt the whole state (components and logs) under `new_key`; returns the new version.

        The store must have been opened with its current key (or with none, to
        encrypt a plaintext store). Everything is read and verified first, then
        written as one new generation and a new key epoch; the manifest replace
        commits it. A crash before that leaves the old state and key in force, a
        crash after it the new ones; files under the old key are deleted at once.
        """
        cipher = new_key.cipher()
        with self._lock(exclusive=True):
            manifest = self._read_manifest()
            components = manifest.components if manifest else {}
            plain = {name: self._component_bytes(name, entry, manifest) for name, entry in components.items()}
            logs = {name: self._log_lines(name, manifest) for name in LOG_NAMES}
            old = manifest.encryption if manifest else None
            version = (manifest.version if manifest else 0) + 1
            encryption = {"scheme": SCHEME, "key_id": cipher.key_id,
                          "store_id": old["store_id"] if old else uuid.uuid4().hex,
                          "epoch": old["epoch"] + 1 if old else 1}  # fmt: skip
            entries = {
                name: self._write_component(name, components[name]["kind"], data, version, encryption, cipher)
                for name, data in plain.items()
            }
            log_files = set()
            for name, lines in logs.items():
                if not lines:
                    continue
                sealed, previous = [], b""
                for line in lines:
                    previous = cipher.seal_line(line, _log_aad(encryption, name, previous))
                    sealed.append(previous + b"\n")
                log_file = f"{name}.e{encryption['epoch']}.jsonl"
                atomic_write_bytes(self.state_dir / log_file, b"".join(sealed))
                log_files.add(log_file)
            fsync_dir(self.state_dir)
            self._replace_manifest(version, entries, encryption, cipher)  # the commit point
            fsync_dir(self.state_dir)
            self._cipher = cipher
            # Nothing under the old key (or in plaintext) is kept: that is what a rotation is for.
            self._collect_garbage({e["file"] for e in entries.values()}, keep_logs=log_files)
            fsync_dir(self.state_dir)
            return version


_PLAIN_LEAVES = (str, int, float, bool, type(None), torch.dtype, torch.Size, torch.device)


def _plain_weights(obj: object, depth: int = 0) -> bool:
    """Whether `obj` is only plain tensors and numbers in dicts, lists and tuples (which torch.load
    with weights_only=True always reads back). False means "try a load", not "invalid"."""
    if depth > 32:
        return False
    if type(obj) in (torch.Tensor, torch.nn.Parameter):
        return obj.layout == torch.strided and not obj.is_quantized
    if type(obj) in _PLAIN_LEAVES:  # exact types: a subclass (numpy.float64, an enum) pickles differently
        return True
    if type(obj) in (dict, collections.OrderedDict):
        return all(type(k) in _PLAIN_LEAVES and _plain_weights(v, depth + 1) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return all(_plain_weights(v, depth + 1) for v in obj)
    return False


def _entry_version(entry: dict) -> int:
    """The generation a manifest entry was saved in (its file name carries it too)."""
    version = entry.get("version")
    return int(version) if isinstance(version, int) else int(_COMPONENT_FILE.fullmatch(entry["file"])["version"])


def _component_aad(encryption: dict, name: str, entry: dict) -> dict:
    """What a component ciphertext is bound to: a file cannot stand in for another component or generation."""
    return {"store": encryption["store_id"], "epoch": encryption["epoch"], "component": name,
            "kind": entry["kind"], "version": entry["version"]}  # fmt: skip
