"""A rollback counter outside the state dir: restoring an older backup never rewinds epsilon.

A state dir restored from an older backup (or wiped and recreated) is a valid,
authentic state, so encryption cannot tell it from the newest one, and its
accountant holds less than was spent. The counter closes that gap: a small
file kept where the site allows, beside the state key by default (node config
`rollback-counter` names another place), that records how many times this
node's accountant has changed and a digest of its newest state. Before every
DP release the client compares the state with the counter and fails closed
when the state is behind (rolled back) or differs at the same count (forged);
after every save that charges the accountant it advances the counter.

A state ahead of the counter is accepted (a crash between the state's save and
the counter's write leaves exactly that) and the counter catches up.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedtower.client.state import ClientStateStore, StateError
from fedtower.data.schema import atomic_write_bytes

COUNTER_FORMAT = "fedtower-rollback-counter/1"
SEQUENCE_KEY = "privacy_sequence"  # in the state's meta: the accountant's changes so far


def accountant_digest(accountant_state: dict | None) -> str:
    if not accountant_state:
        return ""
    canonical = json.dumps(accountant_state, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


class RollbackCounter:
    """The counter file of one node; None path: the site keeps no counter (the server still checks)."""

    def __init__(self, path: Path | None, state_dir: Path):
        self.path = path
        self.state_dir = Path(state_dir).resolve()

    def _read(self) -> dict | None:
        try:
            body = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise StateError(f"The rollback counter {self.path} is unreadable ({err}); refusing to continue.")
        if not isinstance(body, dict) or body.get("format") != COUNTER_FORMAT:
            raise StateError(f"The rollback counter {self.path} is not a {COUNTER_FORMAT} file.")
        return body

    def check(self, store: ClientStateStore) -> None:
        """Fail closed when the state is older than (or differs from) what the counter last saw."""
        if self.path is None:
            return
        meta = store.load("meta", default={}) or {}
        sequence = int(meta.get(SEQUENCE_KEY, 0))
        digest = accountant_digest(store.load("accountant", default=None))
        counter = self._read()
        if counter is None:
            if sequence == 0 and not digest:
                return  # a new site: the counter starts with the first release
            raise StateError(
                f"The state in {store.state_dir} has spent privacy ({sequence} accountant change(s)) but the "
                f"rollback counter {self.path} does not exist: it was deleted, or the counter is new for this "
                "site. Restore it; if the site sets it up for the first time, adopt the current state with "
                f"`fedtower state adopt-counter --state-dir {store.state_dir} --counter {self.path}`."
            )
        if counter.get("state_dir") != str(self.state_dir):
            raise StateError(f"The rollback counter {self.path} belongs to state dir {counter.get('state_dir')}, "
                             f"not {self.state_dir}.")  # fmt: skip
        if sequence < counter["sequence"] or (sequence == counter["sequence"] and digest != counter["accountant"]):
            what = "is older than" if sequence < counter["sequence"] else "differs from"
            raise StateError(
                f"The privacy accountant in {store.state_dir} {what} what this node last saved (change "
                f"{sequence} here, {counter['sequence']} in the rollback counter {self.path}): the state dir was "
                "restored from an older backup, replaced or edited. Refusing to train or evaluate, since that "
                "would spend epsilon the accountant no longer counts. Restore the newest state."
            )

    def advance(self, store: ClientStateStore) -> None:
        """Record the state's current accountant (call after the save that charged it)."""
        if self.path is None:
            return
        meta = store.load("meta", default={}) or {}
        self.write(int(meta.get(SEQUENCE_KEY, 0)), accountant_digest(store.load("accountant", default=None)))

    def write(self, sequence: int, digest: str) -> None:
        body = {"format": COUNTER_FORMAT, "state_dir": str(self.state_dir), "sequence": sequence,
                "accountant": digest}  # fmt: skip
        atomic_write_bytes(self.path, json.dumps(body, sort_keys=True).encode())
        self.path.chmod(0o600)


def adopt(store: ClientStateStore, path: Path) -> dict:
    """Start a counter from the state as it is now (a site setting up its counter for the first time)."""
    counter = RollbackCounter(path, store.state_dir)
    if counter._read() is not None:
        raise StateError(f"The rollback counter {path} exists already; adopting would overwrite what it protects.")
    counter.advance(store)
    return counter._read()
