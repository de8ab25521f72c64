"""A client state's append-only logs (the privacy ledger, the serving event log) and the errors and
digests the state store shares with them.

Each log is one JSON object per line, appended under the store's lock and fsynced; a final line
without its newline is an append that never returned, cut off before the next one. Encrypted, each
line is sealed with the digest of the line before it (see `_log_aad`), so lines cannot be reordered,
dropped from the middle or spliced in. `AppendOnlyLogs` is a part of `ClientStateStore`: it uses the
store's lock, manifest and cipher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fedtower.client.state_crypto import AuthenticationFailed
from fedtower.data.schema import fsync_dir

if TYPE_CHECKING:
    from fedtower.client.state import _Manifest

log = logging.getLogger("fedtower.client.state")

LOG_NAMES: tuple[str, ...] = ("ledger", "events")  # privacy ledger; the local event log for serving


class StateError(RuntimeError):
    """The client's state is missing, corrupt, inconsistent or locked."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class AppendOnlyLogs:
    """The log half of ClientStateStore (which provides _lock, _read_manifest, _commit, _cipher, state_dir)."""

    def _log_file(self, name: str, manifest: _Manifest | None) -> str:
        if name not in LOG_NAMES:
            raise ValueError(f"Unknown log {name!r}; the state keeps the logs {list(LOG_NAMES)}.")
        if manifest is None:
            # A new store: a keyed one gets its first generation (and key epoch) on the first write.
            return f"{name}.jsonl" if self._cipher is None else f"{name}.e1.jsonl"
        return manifest.log_file(name)

    def append_ledger(self, entry: Mapping[str, object]) -> None:
        """Append one privacy-ledger entry (see append_log)."""
        self.append_log("ledger", entry)

    def read_ledger(self) -> list[dict]:
        """Every complete privacy-ledger entry, in order (see read_log)."""
        return self.read_log("ledger")

    def append_log(self, name: str, entry: Mapping[str, object]) -> None:
        """Append one JSON line to log `name` and fsync it before returning.

        A final line without its newline is a write that never completed (its
        append never returned), so it is cut off before the next entry is added.
        Encrypted, each line is sealed with the digest of the line before it, so
        lines cannot be reordered, dropped from the middle or spliced in.
        """
        if not isinstance(entry, Mapping):
            raise TypeError(f"A {name} entry must be a dict, not {type(entry).__name__}.")
        try:
            line = json.dumps(dict(entry), sort_keys=True, separators=(",", ":"), allow_nan=False)
        except ValueError as err:  # auditors read the ledger with any JSON parser: no NaN/Infinity
            raise ValueError(f"A {name} entry must be strict JSON (no NaN or Infinity): {err}.") from None
        with self._lock(exclusive=True):
            manifest = self._read_manifest()
            if manifest is None and self._cipher is not None:
                manifest = self._commit({})  # an empty first generation records the encryption
            path = self.state_dir / self._log_file(name, manifest)
            created = not path.exists()
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                self._cut_unfinished_line(fd, path)
                data = line.encode()
                if manifest is not None and manifest.encryption is not None:
                    previous = _last_line(fd)
                    data = self._cipher.seal_line(data, _log_aad(manifest.encryption, name, previous))
                view = memoryview(data + b"\n")
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.state_dir)

    def _cut_unfinished_line(self, fd: int, path: Path) -> None:
        size = os.fstat(fd).st_size
        end = _end_of_last_complete_line(fd)
        if end == size:
            return
        log.warning(
            "Log %s ended with an unfinished line (%d bytes) from an interrupted append; cutting it off.",
            path,
            size - end,
        )
        os.ftruncate(fd, end)

    def read_log(self, name: str) -> list[dict]:
        """Every complete entry of log `name`, in order; an unfinished final line is reported and skipped."""
        with self._lock(exclusive=False):
            return self._read_log(name, self._read_manifest())

    def _read_log(self, name: str, manifest: _Manifest | None) -> list[dict]:
        return [json.loads(line) for line in self._log_lines(name, manifest)]

    def _log_lines(self, name: str, manifest: _Manifest | None) -> list[bytes]:
        """The verified (and decrypted) JSON lines of one log. Call under the lock."""
        path = self.state_dir / self._log_file(name, manifest)
        label = f"Log {name!r} ({path.name}) of state dir {self.state_dir}"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise StateError(f"{label} is unreadable: {err.strerror or err}.") from None
        *lines, unfinished = data.split(b"\n")
        encryption = manifest.encryption if manifest is not None else None
        plain, previous = [], b""
        for number, line in enumerate(lines, start=1):
            if encryption is not None:
                try:
                    text = self._cipher.open_line(line, _log_aad(encryption, name, previous))
                except AuthenticationFailed:
                    raise StateError(
                        f"{label} failed authentication at line {number}: the line was modified, or lines "
                        "were removed, reordered or copied from another log."
                    ) from None
                previous = line
            else:
                text = line
            try:
                entry = json.loads(text)
            except ValueError:
                entry = None
            if not isinstance(entry, dict):
                raise StateError(f"{label} is corrupt: line {number} is not a JSON object.")
            plain.append(text)
        if unfinished:
            log.warning(
                "Log %s ends with an unfinished line (%d bytes) from an interrupted append; skipping it.",
                path,
                len(unfinished),
            )
        return plain


def _log_aad(encryption: dict, name: str, previous_line: bytes) -> dict:
    """What a log line is bound to: its store, log, key epoch and the line before it."""
    return {"store": encryption["store_id"], "epoch": encryption["epoch"], "log": name,
            "previous": _sha256(previous_line) if previous_line else ""}  # fmt: skip


def _end_of_last_complete_line(fd: int) -> int:
    """Offset just after the last newline of the file (0 when it has none)."""
    end = os.fstat(fd).st_size
    if end == 0 or os.pread(fd, 1, end - 1) == b"\n":
        return end
    while end > 0:  # scan backwards for the last complete line
        start = max(0, end - 4096)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _last_line(fd: int) -> bytes:
    """The last complete line of a file without its newline (b"" for an empty file)."""
    end = _end_of_last_complete_line(fd)
    if end == 0:
        return b""
    start = end - 1
    while start > 0:  # scan backwards for the newline before it
        chunk_start = max(0, start - 4096)
        newline = os.pread(fd, start - chunk_start, chunk_start).rfind(b"\n")
        if newline >= 0:
            start = chunk_start + newline + 1
            break
        start = chunk_start
    return os.pread(fd, end - 1 - start, start)
