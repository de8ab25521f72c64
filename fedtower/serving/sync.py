"""Keeping a serving Recommender in step with its state dir while the node trains.

A SuperNode round (or an evaluation) saves into the state dir that `fedtower
serve` serves from: a newer item-tower snapshot, newer user rows. The server
looks at the manifest's stamp (one stat; every save replaces the manifest) at
most once a second; when a component it serves was saved by someone else, it
reads it off to the side (`StateSync.prepare`, nothing served changes) and the
Recommender swaps it in between requests (`Recommender.apply_refresh`). A
snapshot that cannot be loaded is reported (`error`) and the old one kept.

Saves from serving are merges (`merge_user_rows` inside `ClientStateStore.update`):
only the rows serving changed are written, on top of the newest users table on
disk, under the store's exclusive lock (state.lock), which every training save
takes too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from fedtower.client.local import build_model
from fedtower.client.state import ClientStateStore
from fedtower.config import RunSettings
from fedtower.data.schema import Catalogue
from fedtower.serving.items import LOCAL_ITEMS, ServedItems, stored_local_items
from fedtower.serving.types import TableOptions

log = logging.getLogger("fedtower.serving")

USERS = "users"
WATCHED = ("item_tower", LOCAL_ITEMS, USERS)


@dataclass
class Refresh:
    """What a reload read, ready to be swapped in."""

    versions: dict[str, int] = field(default_factory=dict)  # generations of what was read
    items: ServedItems | None = None
    users: dict | None = None  # the saved users table, when a newer one was read
    added: list[str] = field(default_factory=list)  # ids add_items is adding


class StateSync:
    """Which generations of the state a Recommender serves, and reading newer ones."""

    def __init__(self, store: ClientStateStore, settings: RunSettings, catalogue: Catalogue, table: TableOptions,
                 versions: Mapping[str, int]):  # fmt: skip
        self.store, self.settings, self.catalogue, self.table = store, settings, catalogue, table
        self.synced = {name: int(versions.get(name, 0)) for name in WATCHED}
        self.stamp = store.manifest_stamp()
        self.errors: dict[str, str] = {}  # what failed to load, by component
        self._seen: dict[str, int] = {}  # the generations on disk at the last check
        self._failed_tower = 0  # generation of a snapshot that failed: not retried until a newer one

    def pending(self, force: bool = False) -> set[str]:
        """Components saved by someone else since they were taken in (all of them when forced)."""
        stamp = self.store.manifest_stamp()
        if stamp == self.stamp and not force:
            return set()
        versions = self.store.generations()  # a state that cannot be read raises: retried at the next check
        self.stamp, self._seen = stamp, versions  # the stamp from before the read: a later save shows next time
        if force:
            return set(WATCHED)
        names = {name for name in WATCHED if versions.get(name, 0) != self.synced[name]}
        if versions.get("item_tower") == self._failed_tower:
            names.discard("item_tower")
        return names

    def prepare(self, force: bool = False) -> Refresh | None:
        """Read what is newer (off to the side); None when nothing is. Records what fails in `errors`."""
        try:
            names = self.pending(force)
            self.errors.pop("state", None)
        except Exception as err:  # e.g. a manifest that fails authentication: report it, keep serving
            self.errors["state"] = f"The state dir cannot be read: {_first_line(err)}"
            log.warning("%s", self.errors["state"])
            if force:
                raise
            return None
        if not names:
            return None
        refresh = Refresh()
        if names & {"item_tower", LOCAL_ITEMS}:
            try:
                refresh.items, versions = self.load_items()
                refresh.versions.update(versions)
                self.errors.pop("item_tower", None)
                self._failed_tower = 0
            except Exception as err:  # any broken snapshot: keep serving the old one, never go down
                failed = self._failed_tower = self._seen.get("item_tower", 0)
                self.errors["item_tower"] = (f"The item-tower snapshot of generation {failed} could not be "
                                             f"loaded, so generation {self.synced['item_tower']} is still "
                                             f"served: {_first_line(err)}")  # fmt: skip
                log.warning("%s", self.errors["item_tower"])
        if USERS in names:
            try:
                values, versions = self.store.load_versioned([USERS], default=None)
                refresh.users, refresh.versions[USERS] = values[USERS], versions[USERS]
                self.errors.pop(USERS, None)
            except Exception as err:  # the old rows keep serving
                self.errors[USERS] = f"The saved user embeddings could not be loaded: {_first_line(err)}"
                log.warning("%s", self.errors[USERS])
        return refresh

    def load_items(self) -> tuple[ServedItems, dict[str, int]]:
        """The newest snapshot with the node's local items, built in full before anything is swapped."""
        values, versions = self.store.load_versioned(["item_tower", LOCAL_ITEMS, "meta"], default=None)
        if values["item_tower"] is None:
            raise ValueError("The state dir has no item-tower snapshot.")
        meta = values["meta"] if isinstance(values["meta"], dict) else {}
        items = items_from_snapshot(values["item_tower"], self.settings, self.catalogue,
                                    stored_local_items(values[LOCAL_ITEMS]), self.table,
                                    generation=versions["item_tower"], round=meta.get("last_round"))  # fmt: skip
        return items, {name: versions[name] for name in ("item_tower", LOCAL_ITEMS)}

    def taken_in(self, versions: Mapping[str, int]) -> None:
        """The served state now reflects these generations."""
        for name, version in versions.items():
            self.synced[name] = max(self.synced[name], version)

    def wrote(self, name: str, before: int, after: int) -> None:
        """We saved `name` over generation `before`: only if that was the one served is `after` served too
        (otherwise someone else saved in between, and the next check takes theirs in)."""
        if self.synced[name] == before:
            self.synced[name] = after


def items_from_snapshot(snapshot: dict, settings: RunSettings, catalogue: Catalogue, local: list[dict],
                        table: TableOptions, *, generation: int, round: int | None) -> ServedItems:  # fmt: skip
    """The served table of an item-tower state dict (plus local items); refuses a mismatched or broken one."""
    model = build_model(settings, catalogue, 0)
    model.load_item_tower(snapshot, source="The saved item tower",
                          hint="was it saved with another catalogue or run config? A new catalogue needs a "
                               "restart of the server.")  # fmt: skip
    with torch.no_grad():
        vectors, bias = (t.numpy() for t in model.item_table())
    if not (np.isfinite(vectors).all() and np.isfinite(bias).all()):
        raise ValueError("The saved item tower holds non-finite values (NaN or infinity).")
    tower = model.item_tower if model.item_tower.content_mlp is not None else None
    return ServedItems.build(catalogue, vectors, bias, table=table, content_tower=tower, local=local,
                             generation=generation, round=round)  # fmt: skip


def merge_user_rows(saved: dict | None, rows: Mapping[str, np.ndarray]) -> dict:
    """The saved users table with `rows` written over it (unknown users appended); every other row as saved."""
    users = list(saved["users"]) if saved else []
    dim = len(next(iter(rows.values())))
    table = saved["embeddings"].detach().float().clone() if saved else torch.zeros((0, dim))
    position = {user: row for row, user in enumerate(users)}
    new = [user for user in rows if user not in position]
    if new:
        position.update({user: len(users) + n for n, user in enumerate(new)})
        users += new
        table = torch.cat([table, torch.zeros((len(new), table.shape[1]))])
    for user, vector in rows.items():
        table[position[user]] = torch.as_tensor(np.asarray(vector, dtype=np.float32))
    return {"users": users, "embeddings": table}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
