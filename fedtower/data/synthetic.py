"""A synthetic behaviour log with real, learnable structure.

The generative story, all vectorised numpy under one seeded generator:

- Categories have latent centres; each item belongs to 1-2 categories and its
  latent vector sits near their centres. Item popularity is Zipf-like.
- Each user prefers a few categories and has a latent taste near them. Over
  the user's active period one preferred category may be swapped for another
  (drift), so later behaviour differs from earlier and a temporal split matters.
- Each view picks a category from the user's current preferences (or, for a
  share of views, any item by global popularity), draws a few candidates in
  it by popularity and keeps the one that best matches the taste (with noise).
- A view may lead to a click, a click to a cart, a cart to a purchase
  (about 100:20:4:1); each step is likelier the closer the item is to the taste.
- Events per user are heavy-tailed (log-normal), with a minimum.

Content features carry real signal: category multi-hot, standardised log
price, and a few noisy projections of the item's latent vector.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedtower.data.schema import (
    BEHAVIOURS,
    CATALOGUE_COLUMNS,
    EVENT_COLUMNS,
    Catalogue,
    Dataset,
    atomic_write_text,
)

CATEGORY_NAMES: tuple[str, ...] = (
    "books", "music", "movies", "games", "phones", "computers", "cameras", "audio",
    "kitchen", "home", "garden", "tools", "toys", "baby", "beauty", "health",
    "sports", "outdoors", "fashion", "shoes", "jewellery", "grocery", "pets", "office",
)  # fmt: skip
FUNNEL = ("view", "click", "cart", "purchase")
# Views are generated in chunks to bound memory; fixed so output never depends on it.
_CHUNK_VIEWS = 1 << 17


@dataclass
class SyntheticConfig:
    num_users: int = 1000
    num_items: int = 2000
    num_categories: int = 20
    mean_events_per_user: float = 40.0
    seed: int = 0
    min_events_per_user: int = 5
    latent_dim: int = 16
    popularity_exponent: float = 0.8  # Zipf exponent of item popularity
    exploration: float = 0.1  # share of views drawn from global popularity, not taste
    candidates_per_view: int = 8  # items drawn in a category, of which the best match is viewed
    taste_sharpness: float = 6.0  # how strongly the latent match decides among candidates
    drift: float = 0.7  # probability that a user's tastes shift over their active period
    funnel_rates: tuple[float, float, float] = (0.2, 0.2, 0.25)  # click|view, cart|click, buy|cart
    funnel_sharpness: float = 1.0  # how much closeness to the taste raises each funnel step
    num_brands: int = 60
    num_latent_features: int = 8
    feature_noise: float = 0.5  # noise on the latent features, relative to their signal
    start_timestamp: int = 1_700_000_000
    span_days: float = 365.0

    def __post_init__(self) -> None:
        for name in ("num_users", "num_items", "num_categories", "min_events_per_user",
                     "latent_dim", "candidates_per_view", "num_brands"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, but it is {getattr(self, name)}.")
        if self.num_categories > self.num_items:
            raise ValueError(
                f"There are more categories ({self.num_categories}) than items ({self.num_items})."
            )
        if self.mean_views_per_user <= self.min_events_per_user:
            raise ValueError(
                f"mean_events_per_user ({self.mean_events_per_user}) is too small: with the "
                f"funnel it allows {self.mean_views_per_user:.1f} views per user on average, "
                f"which must exceed min_events_per_user ({self.min_events_per_user})."
            )
        for name in ("exploration", "drift"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"{name} must be between 0 and 1, but it is {getattr(self, name)}."
                )
        if len(self.funnel_rates) != 3 or not all(0.0 < r < 1.0 for r in self.funnel_rates):
            raise ValueError(
                f"funnel_rates must be three probabilities strictly between 0 and 1, "
                f"but it is {self.funnel_rates}."
            )

    @property
    def mean_views_per_user(self) -> float:
        """Views per user such that views plus their funnel events average mean_events_per_user."""
        click, cart, buy = self.funnel_rates
        return self.mean_events_per_user / (1.0 + click + click * cart + click * cart * buy)


def generate(config: SyntheticConfig) -> Dataset:
    """A catalogue and an event log; the same config (seed included) gives identical frames."""
    rng = np.random.default_rng(config.seed)
    items = _make_items(config, rng)
    users = _make_users(config, rng, items)
    views = _make_views(config, rng, items, users)
    events = _funnel_events(config, rng, views)
    catalogue = _make_catalogue(config, rng, items)
    return Dataset(catalogue=catalogue, events=events, name=f"synthetic-seed{config.seed}")


def to_folder(dataset: Dataset, path: str | Path) -> None:
    """Write `catalogue.csv` and `events.csv` in canonical column names.

    Categories are '|'-joined; content features become columns `f_<name>`.
    """
    folder = Path(path)
    catalogue = dataset.catalogue
    table = catalogue.items[list(CATALOGUE_COLUMNS)].copy()
    table["categories"] = table["categories"].map("|".join)
    if catalogue.features is not None:
        for column, name in enumerate(catalogue.feature_names):
            table[f"f_{name}"] = catalogue.features[:, column]
    atomic_write_text(folder / "catalogue.csv", table.to_csv(index=False))
    # The catalogue is public (every party holds it): readable as the umask allows, not only by its owner.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder / "catalogue.csv", 0o644 & ~umask)
    atomic_write_text(  # behaviour data: private, 0600 as written
        folder / "events.csv", dataset.events[list(EVENT_COLUMNS)].to_csv(index=False)
    )


def category_names(num_categories: int) -> list[str]:
    base = len(CATEGORY_NAMES)
    return [
        CATEGORY_NAMES[i % base] + ("" if i < base else f"-{i // base + 1}")
        for i in range(num_categories)
    ]


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=-1, keepdims=True)


def _make_items(config: SyntheticConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n, c, d = config.num_items, config.num_categories, config.latent_dim
    centres = _unit_rows(rng.normal(size=(c, d)))
    # Some categories are much bigger than others.
    category_share = 1.0 / np.arange(1, c + 1) ** 0.7
    category_share = rng.permutation(category_share / category_share.sum())
    primary = rng.choice(c, size=n, p=category_share)
    primary[rng.permutation(n)[:c]] = np.arange(c)  # every category has at least one item
    second = (primary + 1 + rng.integers(0, max(c - 1, 1), n)) % c
    has_second = (rng.random(n) < 0.35) & (second != primary)
    second = np.where(has_second, second, -1)
    latent = centres[primary] + 0.5 * has_second[:, None] * centres[np.maximum(second, 0)]
    latent = _unit_rows(latent + 0.8 * rng.normal(size=(n, d)) / math.sqrt(d))
    popularity = 1.0 / (rng.permutation(n) + 1.0) ** config.popularity_exponent
    return {
        "primary": primary,
        "second": second,
        "latent": latent.astype(np.float32),
        "popularity": popularity / popularity.sum(),
        "category_share": category_share,
        "centres": centres,
    }


def _make_users(
    config: SyntheticConfig, rng: np.random.Generator, items: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    u, c, d = config.num_users, config.num_categories, config.latent_dim
    share, slots = items["category_share"], 3  # at most three preferred categories per user
    start = rng.choice(c, size=(u, slots), p=share)
    active = np.arange(slots) < rng.integers(1, slots + 1, size=u)[:, None]
    weight = rng.gamma(1.0, size=(u, slots)) * active
    weight /= weight.sum(axis=1, keepdims=True)
    # Drift: by the end of the user's period, one preferred category became another.
    end = start.copy()
    drifts = rng.random(u) < config.drift
    slot = _pick_slot(weight, rng.random(u))
    end[drifts, slot[drifts]] = rng.choice(c, size=u, p=share)[drifts]
    personal = 0.6 * rng.normal(size=(u, d)) / math.sqrt(d)
    centres = items["centres"]
    period_s = config.span_days * 86400.0
    return {
        "start": start,
        "end": end,
        "weight": weight,
        "taste_start": _unit_rows(np.einsum("uk,ukd->ud", weight, centres[start]) + personal),
        "taste_end": _unit_rows(np.einsum("uk,ukd->ud", weight, centres[end]) + personal),
        "count": _views_per_user(config, rng),
        "begin": config.start_timestamp + rng.uniform(0.0, 0.6 * period_s, size=u),
        "length": period_s * rng.uniform(0.1, 0.4, size=u),
    }


def _pick_slot(weight: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw of one column per row of a row-stochastic matrix."""
    return (uniform[:, None] > np.cumsum(weight, axis=1)).sum(axis=1).clip(0, weight.shape[1] - 1)


def _views_per_user(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """A minimum plus a Poisson count with log-normal (heavy-tailed) mean."""
    sigma = 1.0
    extra_mean = config.mean_views_per_user - config.min_events_per_user
    rates = rng.lognormal(math.log(extra_mean) - sigma**2 / 2, sigma, size=config.num_users)
    return config.min_events_per_user + rng.poisson(rates)


def _category_sampler(items: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items of every category with a popularity CDF offset by the category number.

    Category c's CDF runs over (c, c + 1], so one searchsorted of c + U[0, 1)
    draws an item of category c in proportion to popularity.
    """
    second = items["second"]
    members = np.r_[np.arange(len(second)), np.flatnonzero(second >= 0)]
    category = np.r_[items["primary"], second[second >= 0]]
    order = np.lexsort((members, category))
    members, category = members[order], category[order]
    mass = items["popularity"][members]
    cumulative = np.cumsum(mass)
    ends = np.flatnonzero(np.r_[category[1:] != category[:-1], True])
    totals = np.diff(np.r_[0.0, cumulative[ends]])
    before = np.r_[0.0, cumulative[ends[:-1]]]
    cdf = category + (cumulative - before[category]) / totals[category]
    return members, cdf, ends


def _make_views(
    config: SyntheticConfig,
    rng: np.random.Generator,
    items: dict[str, np.ndarray],
    users: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    counts = users["count"]
    user = np.repeat(np.arange(config.num_users), counts)
    # Sorted uniforms per user: the share of the user's period at which each view happens.
    position = np.clip(np.sort(user + rng.random(len(user))) - user, 0.0, 1.0)
    members, category_cdf, category_end = _category_sampler(items)
    popularity_cdf = np.cumsum(items["popularity"])
    latent, m = items["latent"], config.candidates_per_view
    item = np.empty(len(user), dtype=np.int64)
    affinity = np.empty(len(user), dtype=np.float32)
    for lo in range(0, len(user), _CHUNK_VIEWS):
        who, when = user[lo : lo + _CHUNK_VIEWS], position[lo : lo + _CHUNK_VIEWS, None]
        n = len(who)
        taste = (1.0 - when) * users["taste_start"][who] + when * users["taste_end"][who]
        taste = _unit_rows(taste).astype(np.float32)
        slot = _pick_slot(users["weight"][who], rng.random(n))
        late = rng.random(n) < when[:, 0]
        category = np.where(late, users["end"][who, slot], users["start"][who, slot])
        drawn = np.searchsorted(category_cdf, category[:, None] + rng.random((n, m)), side="right")
        candidates = members[np.minimum(drawn, category_end[category][:, None])]
        match = np.einsum("nd,nmd->nm", taste, latent[candidates])
        noisy = config.taste_sharpness * match + rng.gumbel(size=(n, m))
        chosen = candidates[np.arange(n), noisy.argmax(axis=1)]
        popular = np.searchsorted(popularity_cdf, rng.random(n) * popularity_cdf[-1], side="right")
        explore = rng.random(n) < config.exploration
        picked = np.where(explore, np.minimum(popular, config.num_items - 1), chosen)
        item[lo : lo + n] = picked
        affinity[lo : lo + n] = np.einsum("nd,nd->n", taste, latent[picked])
    time = users["begin"][user] + position * users["length"][user]
    return {"user": user, "item": item, "time": time, "affinity": affinity}


def _funnel_events(
    config: SyntheticConfig, rng: np.random.Generator, views: dict[str, np.ndarray]
) -> pd.DataFrame:
    """Views, then clicks, carts and purchases, each likelier for a closer match."""
    closeness = views["affinity"].astype(np.float64)
    closeness = (closeness - closeness.mean()) / max(closeness.std(), 1e-12)
    reached = np.arange(len(closeness))
    time = views["time"]
    parts_user, parts_item, parts_time, parts_code = [views["user"]], [views["item"]], [time], []
    parts_code.append(np.full(len(reached), BEHAVIOURS.index("view"), dtype=np.int8))
    mean_delay_s = {"click": 20.0, "cart": 90.0, "purchase": 300.0}
    for behaviour, rate in zip(FUNNEL[1:], config.funnel_rates):
        lift = config.funnel_sharpness * closeness[reached]
        chance = _sigmoid(_intercept_for_rate(lift, rate) + lift)
        step = rng.random(len(reached)) < chance
        reached, time = reached[step], time[step]
        time = time + 1.0 + rng.exponential(mean_delay_s[behaviour], size=len(reached))
        parts_user.append(views["user"][reached])
        parts_item.append(views["item"][reached])
        parts_time.append(time)
        parts_code.append(np.full(len(reached), BEHAVIOURS.index(behaviour), dtype=np.int8))
    user, item = np.concatenate(parts_user), np.concatenate(parts_item)
    code, timestamp = np.concatenate(parts_code), np.floor(np.concatenate(parts_time))
    timestamp = timestamp.astype(np.int64)
    order = np.lexsort((code, item, user, timestamp))
    return pd.DataFrame(
        {
            "user": _id_column("u", config.num_users, user[order]),
            "item": _id_column("i", config.num_items, item[order]),
            "behaviour": pd.Series(list(BEHAVIOURS), dtype="str")
            .take(code[order])
            .reset_index(drop=True),
            "timestamp": timestamp[order],
            "value": np.full(len(order), np.nan),
        }
    )


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _intercept_for_rate(lift: np.ndarray, rate: float) -> float:
    """The intercept b with mean(sigmoid(b + lift)) = rate, by bisection on a subsample."""
    if not len(lift):
        return 0.0
    sample = lift[:: max(1, len(lift) // 65536)]
    low, high = -30.0, 30.0
    for _ in range(50):
        middle = (low + high) / 2
        if _sigmoid(middle + sample).mean() < rate:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def _id_width(count: int) -> int:
    return max(5, len(str(count - 1)))


def _ids(prefix: str, count: int) -> list[str]:
    width = _id_width(count)
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def _id_column(prefix: str, count: int, codes: np.ndarray) -> pd.Series:
    return pd.Series(_ids(prefix, count), dtype="str").take(codes).reset_index(drop=True)


def _make_catalogue(
    config: SyntheticConfig, rng: np.random.Generator, items: dict[str, np.ndarray]
) -> Catalogue:
    n, c = config.num_items, config.num_categories
    names = category_names(c)
    primary, second = items["primary"], items["second"]
    categories = [
        (names[p],) if s < 0 else (names[p], names[s])
        for p, s in zip(primary.tolist(), second.tolist())
    ]
    # Prices are log-normal around a level that depends on the category.
    log_price = rng.uniform(math.log(5.0), math.log(300.0), size=c)[primary] + 0.5 * rng.normal(
        size=n
    )
    # Each brand mostly sells in one category.
    brand = (
        primary + c * rng.integers(0, math.ceil(config.num_brands / c), size=n)
    ) % config.num_brands
    ids = _ids("i", n)
    table = pd.DataFrame(
        {
            "item": ids,
            "title": [
                f"{names[p].capitalize()} item {i[1:]}" for p, i in zip(primary.tolist(), ids)
            ],
            "categories": categories,
            "price": np.round(np.exp(log_price), 2),
            "brand": [f"brand{b:03d}" for b in brand.tolist()],
        }
    )
    multi_hot = np.zeros((n, c), dtype=np.float32)
    multi_hot[np.arange(n), primary] = 1.0
    multi_hot[np.flatnonzero(second >= 0), second[second >= 0]] = 1.0
    # Noisy projections of the latent vector: content that predicts behaviour.
    projection = rng.normal(size=(config.latent_dim, config.num_latent_features))
    signal = items["latent"] @ projection
    latent_features = signal + config.feature_noise * signal.std() * rng.normal(size=signal.shape)
    features = np.hstack(
        [multi_hot, _standardise(log_price[:, None]), _standardise(latent_features)]
    )
    feature_names = (
        [f"category_{name}" for name in names]
        + ["log_price"]
        + [f"latent_{j}" for j in range(config.num_latent_features)]
    )
    return Catalogue(items=table, features=features, feature_names=feature_names)


def _standardise(columns: np.ndarray) -> np.ndarray:
    return (columns - columns.mean(axis=0)) / np.maximum(columns.std(axis=0), 1e-12)
