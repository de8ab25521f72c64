"""Event and catalogue schemas, and the public item index.

One event is (user, item, behaviour, timestamp[, value]). Behaviour is private;
the catalogue (and so the item index) is public and shared by every party.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

BEHAVIOURS: tuple[str, ...] = ("view", "click", "cart", "purchase", "rating", "dwell")
# Behaviours whose `value` column is required (rating in 0.5-5, dwell in seconds).
VALUED_BEHAVIOURS: frozenset[str] = frozenset({"rating", "dwell"})

# Canonical event frame: user (str), item (str), behaviour (str), timestamp
# (int64 seconds since the Unix epoch, UTC), value (float64, NaN when absent).
EVENT_COLUMNS: tuple[str, ...] = ("user", "item", "behaviour", "timestamp", "value")

# Canonical catalogue frame, one row per item, in item-index order.
CATALOGUE_COLUMNS: tuple[str, ...] = ("item", "title", "categories", "price", "brand")


def empty_events() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user": pd.Series([], dtype=object),
            "item": pd.Series([], dtype=object),
            "behaviour": pd.Series([], dtype=object),
            "timestamp": pd.Series([], dtype=np.int64),
            "value": pd.Series([], dtype=np.float64),
        }
    )


class ItemIndex:
    """Maps public item ids to rows 0..n-1, fixed by the catalogue.

    It is never derived from a client's private events, so every client and
    the server map ids identically. `fingerprint` lets parties check that.
    """

    def __init__(self, item_ids: list[str]):
        ids = [str(i) for i in item_ids]
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dup = next(i for i in ids if i in seen or seen.add(i))
            raise ValueError(f"Item ids must be unique; '{dup}' appears more than once.")
        self.ids: list[str] = ids
        self._row = {item: row for row, item in enumerate(ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item: object) -> bool:
        return str(item) in self._row

    def row(self, item: str) -> int:
        return self._row[str(item)]

    def rows(self, items) -> np.ndarray:
        """Rows of known item ids; raises KeyError naming the first unknown id."""
        try:
            return np.fromiter((self._row[str(i)] for i in items), dtype=np.int64)
        except KeyError as err:
            raise KeyError(f"Item id {err.args[0]!r} is not in the catalogue's item index.") from None

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self.ids).encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        payload = {"fingerprint": self.fingerprint, "ids": self.ids}
        atomic_write_text(Path(path), json.dumps(payload))

    @classmethod
    def load(cls, path: str | Path) -> ItemIndex:
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
            index = cls(payload["ids"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a readable item index ({err}).") from None
        if payload.get("fingerprint") != index.fingerprint:
            raise ValueError(f"{path}: item index fingerprint does not match its ids (file corrupt?).")
        return index


@dataclass
class Catalogue:
    """The public item catalogue.

    `items` has CATALOGUE_COLUMNS, one row per item in index order;
    `categories` holds tuples of strings. `features` are dense content
    features (float32, one row per item) that the item tower's MLP reads.
    """

    items: pd.DataFrame
    features: np.ndarray | None = None
    feature_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        missing = [c for c in CATALOGUE_COLUMNS if c not in self.items.columns]
        if missing:
            raise ValueError(f"Catalogue is missing columns {missing}.")
        self.items = self.items.reset_index(drop=True)
        self.index = ItemIndex(self.items["item"].astype(str).tolist())
        if self.features is not None:
            self.features = np.asarray(self.features, dtype=np.float32)
            if self.features.shape[0] != len(self.items):
                raise ValueError(
                    f"Catalogue has {len(self.items)} items but {self.features.shape[0]} feature rows."
                )

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_features(self) -> int:
        return 0 if self.features is None else int(self.features.shape[1])


@dataclass
class Dataset:
    """A catalogue plus an event log (canonical EVENT_COLUMNS frame)."""

    catalogue: Catalogue
    events: pd.DataFrame
    name: str = "dataset"


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` so that readers see the old or the new file, never half.

    `durable=False` skips the fsync: still atomic for readers and after a process crash, but a
    power loss may lose the write (for state that a rerun recreates, e.g. a simulation's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def fsync_dir(path: Path) -> None:
    """Make renames and new files in `path` durable, not only their contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
