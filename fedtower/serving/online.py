"""Serving that learns from what it serves: `record()` logs an event to the node's state and refits
that user's vector at once, so the next recommendation reflects it; the next round trains on the log.

`OnlineUpdates` is a part of `Recommender` (it uses the recommender's tables, users and state).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from fedtower.data.schema import EVENT_COLUMNS
from fedtower.data.validation import validate_events
from fedtower.serving.pooling import refit_free
from fedtower.serving.sync import USERS, merge_user_rows

log = logging.getLogger("fedtower.serving")


@dataclass
class RecordResult:
    """What record() did: the event as logged, whether it counts as an interaction, how long it took."""

    user: str
    item: str
    behaviour: str
    timestamp: int
    value: float | None
    counted: bool  # False: logged, but too weak to be an interaction (e.g. a short dwell)
    weight: float
    milliseconds: float  # all of it: validation, the fsync'd log append, the update, the atomic save
    update_milliseconds: float  # the embedding update alone (in memory)
    new_user: bool = False  # True: this event created the user on this node (served by pooling until trained)

    def to_dict(self) -> dict:
        return asdict(self)


class OnlineUpdates:
    """The recording half of Recommender."""

    def record(self, event: Mapping) -> RecordResult:
        """Log one event and update that user's embedding now (item tower frozen).

        The event is appended (fsync'd) to the state dir's event log, which the
        next round's training reads; the user's history takes the item, a few
        gradient steps move the user's free vector, and that row alone is saved
        over the newest user table in the state (another process's rows are
        kept). An unknown user is created on this node: served by pooling their
        history (like a cold start) until a round trains them.
        """
        started = time.perf_counter()
        clean = self._validated_event(event)
        item_row = self.catalogue.index.row(clean["item"])
        if self.event_log is not None:
            self.event_log.append(clean)
        new_user = clean["user"] not in self._user_row
        row = self._add_user(clean["user"]) if new_user else self._user_row[clean["user"]]
        frame = pd.DataFrame([clean])
        counted, weight = (x[0] for x in self.behaviour_weights.label_and_weight(frame))
        trained = clean["user"] not in self._new_users
        base = self.free[row].copy()  # the row as loaded or last saved: what the update starts from
        update_started = time.perf_counter()
        if counted:
            self._add_interaction(row, item_row, float(weight))
            if trained:
                self._refit(row)
            self._prior = None  # the site prior moves with its users
        update_ms = 1e3 * (time.perf_counter() - update_started)
        if counted and trained:
            self._changed.add(clean["user"])
            self._save_rows({clean["user"]: base})
        return RecordResult(**{k: clean[k] for k in EVENT_COLUMNS}, counted=bool(counted),
                            weight=float(weight), milliseconds=1e3 * (time.perf_counter() - started),
                            update_milliseconds=update_ms, new_user=new_user)  # fmt: skip

    def _save_rows(self, bases: Mapping[str, np.ndarray]) -> None:
        """Write these users' rows over the newest saved table, under the store's exclusive lock.

        `bases` holds the row each user's update started from. A saved row that
        differs from it was written by a round meanwhile: the user's events are
        fitted again on top of that trained row, so neither is lost.
        """
        if self.store is None:
            return

        def merge(saved: dict | None) -> dict:
            for user, base in bases.items():
                trained_row = _saved_row(saved, user)
                if trained_row is not None and not np.array_equal(trained_row, base):
                    self.free[self._user_row[user]] = trained_row
                    self._refit(self._user_row[user])
            return merge_user_rows(saved, {user: self.free[self._user_row[user]].copy() for user in bases})

        before, after = self.store.update(USERS, merge)
        if self._sync is not None:
            self._sync.wrote(USERS, before, after)

    def _add_user(self, user: str) -> int:
        """A user this node has no state for: no trained row, an empty history."""
        row = len(self.users)
        self.users.append(user)
        self._user_row[user] = row
        self.free = np.vstack([self.free, np.zeros((1, self.table.dim), np.float32)])
        self._history.append(np.zeros(0, dtype=np.int64))
        self._weights.append(np.zeros(0, dtype=np.float32))
        self._new_users.add(user)
        return row

    def _validated_event(self, event: Mapping) -> dict:
        if not isinstance(event, Mapping):
            raise ValueError(f"An event must be a mapping with fields {list(EVENT_COLUMNS)}, not "
                             f"{type(event).__name__}.")  # fmt: skip
        unknown = sorted(set(event) - set(EVENT_COLUMNS))
        if unknown:
            raise ValueError(f"Event field {unknown[0]!r} is not known; events have {list(EVENT_COLUMNS)}.")
        for name in ("user", "item", "behaviour"):
            if not isinstance(event.get(name), str) or not event.get(name).strip():
                raise ValueError(f"Event field '{name}' is required and must be a non-empty string.")
        if event["user"] != event["user"].strip():
            raise ValueError("Event field 'user' must not start or end with spaces.")
        self.row_of_item(event["item"])
        timestamp = event.get("timestamp")
        if timestamp is None:
            timestamp = int(time.time())
        if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float, str)):
            raise ValueError(f"Event field 'timestamp' must be seconds since the epoch, got {timestamp!r}.")
        value = event.get("value")
        raw = {"user": event["user"], "item": event["item"], "behaviour": event["behaviour"],
               "timestamp": str(timestamp), "value": "" if value is None else str(value)}  # fmt: skip
        # The loaders' own checks (behaviour, time, value ranges): the same rules as the data files.
        # The item was checked above: catalogue=None spares an O(catalogue) membership test.
        clean, _ = validate_events(pd.DataFrame([raw]), source="event", first_line=1, catalogue=None)
        value = clean["value"].iloc[0]
        return {"user": str(event["user"]), "item": str(event["item"]), "behaviour": str(event["behaviour"]),
                "timestamp": int(clean["timestamp"].iloc[0]),
                "value": None if pd.isna(value) else float(value)}  # fmt: skip

    def _add_interaction(self, row: int, item_row: int, weight: float) -> None:
        """One interaction per item (as training builds them): a repeat keeps its place, strongest weight.

        A new item goes last (the newest): record() serves events as they happen. An event
        back-dated behind the history is placed by its time at the next load.
        """
        history, weights = self._history[row], self._weights[row]
        where = np.flatnonzero(history == item_row)
        if where.size:
            weights[where[0]] = max(weights[where[0]], weight)
        else:
            self._history[row] = np.append(history, item_row)
            self._weights[row] = np.append(weights, np.float32(weight))

    def _refit(self, row: int) -> None:
        history = self._history[row]
        vector, _, _ = self._vector(history, self.free[row])
        pooled = vector - self.free[row]
        self.free[row] = refit_free(self.free[row], pooled, self.table.vectors, self.table.bias, history,
                                    self._weights[row], steps=self.config.update_steps,
                                    lr=self.config.update_lr, l2=self.config.user_l2,
                                    sample=self.config.update_sample, seed=len(history))  # fmt: skip

    def _replay_log(self) -> None:
        """What the node's data cannot carry yet: users only the event log knows, events on local items.

        load_node_data merges the log's events on catalogue items; events on items
        added on this node wait there until the catalogue carries the item.
        """
        if self.event_log is None or not self.event_log.exists():
            return
        local = set(self._items.local_ids)
        for entry in self.event_log.entries():
            if entry.get("user") in self._user_row and entry.get("item") not in local:
                continue  # the node's data carries it
            try:
                clean = self._validated_event({k: v for k, v in entry.items() if k in EVENT_COLUMNS})
            except ValueError:
                continue  # load_node_data reported it already
            user = clean["user"]
            row = self._user_row[user] if user in self._user_row else self._add_user(user)
            if clean["item"] in local:
                counted, weight = (x[0] for x in self.behaviour_weights.label_and_weight(pd.DataFrame([clean])))
                if counted:
                    self._add_interaction(row, self.catalogue.index.row(clean["item"]), float(weight))

    # ------------------------------------------------------------------ following the state dir


def _saved_row(saved: dict | None, user: str) -> np.ndarray | None:
    if not saved or user not in saved["users"]:
        return None
    return saved["embeddings"][saved["users"].index(user)].float().numpy()
