"""The node's local event log: events recorded while serving, kept for the next round.

Serving (`Recommender.record`) appends each event to the state store's
append-only "events" log (one JSON line each, fsync'd; sealed like the other
logs when the state is encrypted). `load_node_data` merges these events into
the node's own data, so the next round trains on them under the same rules
(and the same DP accounting) as every other local event.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from fedtower.client.state import ClientStateStore
from fedtower.data.schema import EVENT_COLUMNS, Catalogue, empty_events
from fedtower.data.validation import RowOrigins, ValidationReport, validate_located_events

log = logging.getLogger("fedtower.client")

EVENT_LOG = "events"


class EventLog:
    """Canonical events (user, item, behaviour, timestamp, value) in the state's "events" log."""

    def __init__(self, store: ClientStateStore):
        self.store = store

    def exists(self) -> bool:
        return any(self.store.state_dir.glob(f"{EVENT_LOG}*.jsonl"))

    def append(self, event: dict) -> None:
        """Write one event and fsync it before returning."""
        self.store.append_log(EVENT_LOG, {k: event.get(k) for k in EVENT_COLUMNS})

    def entries(self) -> list[dict]:
        """Every complete entry as logged (JSON objects, in order)."""
        return self.store.read_log(EVENT_LOG)

    def read_raw(self) -> pd.DataFrame:
        """Every complete entry as a raw event frame (text values, as the loaders give them)."""
        rows = [
            {k: ("" if entry.get(k) is None else str(entry.get(k))) for k in EVENT_COLUMNS}
            for entry in self.entries()
        ]
        return pd.DataFrame(rows, columns=list(EVENT_COLUMNS))

    def load(self, catalogue: Catalogue) -> tuple[pd.DataFrame, ValidationReport]:
        """Validated canonical events; bad entries are skipped and reported (log, line, field).

        Events on items this node added to its served catalogue (the state's
        "local_items") wait, unreported, until the catalogue carries the item.
        """
        raw = self.read_raw()
        source = str(self.store.state_dir / f"{EVENT_LOG}.jsonl")
        if raw.empty:
            return empty_events(), ValidationReport(sources=[source])
        origins = RowOrigins.consecutive(source, len(raw), 1)
        waiting = raw["item"].isin(self._local_items(catalogue)).to_numpy()
        if waiting.any():
            log.info("%d logged event(s) on items added on this node wait until the catalogue carries them.",
                     int(waiting.sum()))  # fmt: skip
            raw = raw[~waiting].reset_index(drop=True)
            origins = RowOrigins(origins.files, origins.file_codes[~waiting], origins.lines[~waiting])
            if raw.empty:
                return empty_events(), ValidationReport(sources=[source])
        return validate_located_events(raw, origins, catalogue=catalogue.index, on_error="skip",
                                       header_line=0)  # fmt: skip

    def _local_items(self, catalogue: Catalogue) -> list[str]:
        saved = self.store.load("local_items", default=None)
        items = saved.get("items", []) if isinstance(saved, dict) else []
        return [entry["item"] for entry in items if entry.get("item") not in catalogue.index]


def merge_events(events: pd.DataFrame, recorded: pd.DataFrame) -> pd.DataFrame:
    """The node's events plus the recorded ones, in canonical dtypes."""
    if recorded.empty:
        return events
    merged = pd.concat([events, recorded[list(EVENT_COLUMNS)]], ignore_index=True)
    merged["timestamp"] = merged["timestamp"].astype(np.int64)
    return merged
