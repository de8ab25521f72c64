"""The served item table: the global item tower's catalogue plus items this node added itself.

The catalogue (and so the item tower's shape) is the server's; a new product
arrives with the next catalogue version. Until then a node can serve it from
its content features alone: `ItemTower.content_vectors` gives its vector, and
it gets the catalogue's median bias (a typical item: untrained, it has no
popularity of its own). Such items are kept in the state component
"local_items" (sealed like the rest of the state) as their features, not their
vectors, so a newer item tower re-embeds them. An id the server's catalogue
carries again is served from the catalogue, and the local copy is ignored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import torch

from fedtower.data.schema import Catalogue
from fedtower.models.two_tower import ItemTower
from fedtower.serving.scoring import ItemTable
from fedtower.serving.types import ItemExistsError, TableOptions

log = logging.getLogger("fedtower.serving")

LOCAL_ITEMS = "local_items"  # the state component
ITEM_FIELDS = ("item", "features", "title", "categories", "price")


@dataclass
class ServedItems:
    """Everything item-side a Recommender serves from; replaced whole, never edited in place."""

    catalogue: Catalogue
    table: ItemTable
    content_tower: ItemTower | None
    base_items: int  # rows of the server's catalogue; rows from here on were added on this node
    generation: int = 0  # the item-tower snapshot's generation in the state dir (0: not from one)
    round: int | None = None  # the last round the node took part in when the snapshot was saved
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    category_masks: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        items = self.catalogue.items
        self.titles = items["title"].fillna("").astype(str).tolist()
        self.categories = [tuple(c) if isinstance(c, (tuple, list)) else () for c in items["categories"]]
        self.prices = pd.to_numeric(items["price"], errors="coerce").to_numpy(np.float64)
        self.has_prices = bool(np.isfinite(self.prices).any())

    @property
    def local_ids(self) -> list[str]:
        return self.catalogue.index.ids[self.base_items :]

    @classmethod
    def build(cls, catalogue: Catalogue, vectors: np.ndarray, bias: np.ndarray, *, table: TableOptions,
              content_tower: ItemTower | None, local: Sequence[Mapping] = (), base_items: int | None = None,
              generation: int = 0, round: int | None = None) -> ServedItems:  # fmt: skip
        """The table of `catalogue` (vectors, bias) with the `local` items (parsed entries) appended."""
        base_items = len(catalogue) if base_items is None else base_items
        carried = [e["item"] for e in local if e["item"] in catalogue.index]
        if carried:
            log.info("The catalogue now carries %d item(s) added on this node (e.g. %r); serving its rows.",
                     len(carried), carried[0])  # fmt: skip
        local = [e for e in local if e["item"] not in catalogue.index]
        if local:
            features = np.asarray([e["features"] for e in local], dtype=np.float32)
            new_vectors = embed(content_tower, features)
            typical = float(np.median(bias[:base_items])) if base_items else 0.0
            vectors = np.vstack([vectors, new_vectors])
            bias = np.concatenate([bias, np.full(len(local), typical, dtype=np.float32)])
            catalogue = _extended(catalogue, local, features)
        return cls(catalogue=catalogue, table=ItemTable(vectors, bias, table), content_tower=content_tower,
                   base_items=base_items, generation=generation, round=round)  # fmt: skip

    def with_local(self, local: Sequence[Mapping]) -> ServedItems:
        """A new table with `local` (parsed, new ids) appended; this one is left as it was."""
        return ServedItems.build(self.catalogue, self.table.vectors, self.table.bias, table=self.table.options,
                                 content_tower=self.content_tower, local=local, base_items=self.base_items,
                                 generation=self.generation, round=self.round)  # fmt: skip


def embed(content_tower: ItemTower | None, features: np.ndarray) -> np.ndarray:
    """Item vectors from content features alone (float32 [n, dim])."""
    if content_tower is None:
        raise ValueError("This model has no content tower (the catalogue has no content features), so it cannot "
                         "embed items from their features.")  # fmt: skip
    with torch.no_grad():
        vectors = content_tower.content_vectors(torch.as_tensor(features)).numpy()
    if not np.isfinite(vectors).all():
        raise ValueError("The content tower gave non-finite vectors for these features.")
    return vectors


def parse_new_items(items: object, catalogue: Catalogue) -> list[dict]:
    """Validated entries {"item", "features", "title", "categories", "price"} (JSON-ready).

    Refuses ids the served catalogue already has (ItemExistsError) and repeats
    within `items`; every other problem is a ValueError naming the field.
    """
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence) or not items:
        raise ValueError("Field 'items' must be a non-empty list of items.")
    width = catalogue.num_features
    parsed, seen = [], set()
    for n, item in enumerate(items):
        where = f"items[{n}]"
        if not isinstance(item, Mapping):
            raise ValueError(f"Field '{where}' must be an object with fields {list(ITEM_FIELDS)}.")
        unknown = sorted(set(item) - set(ITEM_FIELDS))
        if unknown:
            raise ValueError(f"Field '{where}.{unknown[0]}' is not known; items have {list(ITEM_FIELDS)}.")
        item_id = item.get("item")
        if not isinstance(item_id, str) or not item_id.strip() or item_id != item_id.strip():
            raise ValueError(f"Field '{where}.item' must be a non-empty id without surrounding spaces.")
        if item_id in catalogue.index or item_id in seen:
            raise ItemExistsError(f"Field '{where}.item': item {item_id!r} is already in the served catalogue.")
        seen.add(item_id)
        parsed.append({"item": item_id, "features": _features(item.get("features"), width, where),
                       "title": _text(item.get("title", ""), f"{where}.title"),
                       "categories": _categories(item.get("categories"), where),
                       "price": _price(item.get("price"), where)})  # fmt: skip
    return parsed


def _features(values: object, width: int, where: str) -> list[float]:
    if width == 0:
        raise ValueError("This catalogue has no content features, so new items cannot be embedded.")
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != width:
        raise ValueError(f"Field '{where}.features' must be a list of {width} numbers (the catalogue's content "
                         "features, in its feature order).")  # fmt: skip
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"Field '{where}.features' must hold finite numbers only.")
    return [float(v) for v in values]


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"Field '{where}' must be a string.")
    return value


def _categories(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"Field '{where}.categories' must be a list of strings.")
    return [_text(c, f"{where}.categories") for c in value]


def _price(value: object, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Field '{where}.price' must be a non-negative number.")
    return float(value)


def _extended(catalogue: Catalogue, local: Sequence[Mapping], features: np.ndarray) -> Catalogue:
    rows = pd.DataFrame({"item": [e["item"] for e in local], "title": [e["title"] for e in local],
                         "categories": [tuple(e["categories"]) for e in local],
                         "price": [np.nan if e["price"] is None else e["price"] for e in local],
                         "brand": [""] * len(local)})  # fmt: skip
    items = pd.concat([catalogue.items, rows], ignore_index=True)
    stacked = None if catalogue.features is None else np.vstack([catalogue.features, features])
    return Catalogue(items, stacked, list(catalogue.feature_names))


def stored_local_items(saved: object) -> list[dict]:
    """The entries of the "local_items" component ([] when there is none)."""
    if saved is None:
        return []
    if not isinstance(saved, dict) or not isinstance(saved.get("items"), list):
        raise ValueError("The state's 'local_items' component is not {'items': [...]}.")
    return saved["items"]
