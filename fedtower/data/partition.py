"""Split a dataset's users into federated clients.

Two schemes. "users" is cross-device: every user is a client of their own.
"sites" is N partner sites, which in real life differ in size and in the
tastes of their users; `size_skew` and `taste_skew` simulate both, so that a
run can be tested on clients that are not identically distributed.

Only the simulator sees every user. It splits them by user id, taste and seed,
never by the order rows happen to arrive in, so the server and each client
compute the same split independently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedtower.data.schema import Catalogue, Dataset
from fedtower.data.weights import BehaviourWeights

SCHEMES: tuple[str, ...] = ("users", "sites")


@dataclass(frozen=True)
class PartitionConfig:
    """How users are split into clients.

    scheme: "users" gives every user a client of their own; `num_partitions`
        must then be 0 (as many as there are users) or exactly the number of
        users. "sites" gives `num_partitions` partner sites.
    size_skew: 0 makes sites equal in size (within one user); s > 0 sizes them
        by a power law, the r-th largest in proportion to 1 / r**s.
    taste_skew: the share of users (0 to 1) placed on sites by taste, so that
        users with the same dominant category share a site; the others are
        placed at random. 0 is a random split (see `assign_users`).
    seed: fixes which site gets which size and the random order of users.
    """

    scheme: str = "sites"
    num_partitions: int = 10
    size_skew: float = 0.0
    taste_skew: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(
                f"The partitioning scheme must be one of {list(SCHEMES)}, but it is {self.scheme!r}."
            )
        for name in ("num_partitions", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number of at least 0, but it is {value!r}.")
        if self.scheme == "sites" and self.num_partitions < 1:
            raise ValueError(
                f"The 'sites' scheme needs at least one site, but num_partitions is {self.num_partitions}."
            )
        for name in ("size_skew", "taste_skew"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, but it is {value!r}.")
            if value < 0:
                raise ValueError(f"{name} must be 0 or more, but it is {value}.")
            if name == "taste_skew" and value > 1:
                raise ValueError(
                    f"taste_skew is the share of users placed by taste, so it must be between "
                    f"0 and 1, but it is {value}."
                )
            # A skew that cannot act would be ignored silently; say so instead.
            if self.scheme == "users" and value != 0:
                raise ValueError(
                    f"{name} is {value}, but skews apply only to the 'sites' scheme: under "
                    "'users' every client holds exactly one user. Set it to 0."
                )

    def partitions_for(self, num_users: int) -> int:
        """How many partitions this config makes of `num_users` users (checked)."""
        if self.scheme == "users":
            if self.num_partitions not in (0, num_users):
                raise ValueError(
                    f"The 'users' scheme gives each of the {num_users} users a client, but "
                    f"num_partitions is {self.num_partitions}; set it to {num_users} or to 0."
                )
            return num_users
        if self.num_partitions > num_users:
            raise ValueError(
                f"num_partitions ({self.num_partitions}) is more than the number of users "
                f"({num_users}), but every site needs at least one user."
            )
        return self.num_partitions


def site_sizes(num_users: int, num_sites: int, size_skew: float) -> np.ndarray:
    """Users per site, roughly largest first: one each, the rest shared in proportion to rank**-size_skew."""
    if not 1 <= num_sites <= num_users:
        raise ValueError(
            f"Cannot make {num_sites} sites of {num_users} users; every site needs at least one user."
        )
    share = 1.0 / np.arange(1, num_sites + 1, dtype=np.float64) ** size_skew
    return 1 + _apportion(num_users - num_sites, share / share.sum())


def _apportion(total: int, share: np.ndarray) -> np.ndarray:
    """Whole numbers proportional to `share` that add up to `total` (largest remainders round up)."""
    exact = total * share
    whole = np.floor(exact).astype(np.int64)
    left = total - int(whole.sum())
    whole[np.argsort(-(exact - whole), kind="stable")[:left]] += 1
    return whole


def assign_users(
    users: list[str], config: PartitionConfig, *, user_tastes: np.ndarray | None = None
) -> np.ndarray:
    """The partition id of each user, aligned with `users`.

    Users are sorted by id first, so the result depends on the set of users,
    their tastes and the seed, never on the order of `users`.

    "users": the i-th user in id order is partition i.
    "sites": site sizes come from `site_sizes`, shuffled among the sites.
    Every user gets a sort key, and users sorted by key fill site 0, then
    site 1, and so on. A random `taste_skew` share of the users are keyed by
    their place in the taste order (by dominant category, then strongest
    share first, users without any taste last), scaled to [0, 1); the rest
    by a uniform random number. So each site holds a run of the taste order,
    i.e. one or a few dominant categories, diluted by randomly placed users:
    at 0 the split is random, at 1 it follows the taste order exactly.
    `user_tastes` (one row per user, aligned with `users`, e.g. from
    `user_category_profile`) is needed only when taste_skew > 0.
    """
    ids = [str(user) for user in users]
    if len(set(ids)) != len(ids):
        raise ValueError("The user list names some users more than once; each user must appear once.")
    num_partitions = config.partitions_for(len(ids))
    by_id = np.argsort(np.array(ids, dtype=str), kind="stable")
    if config.scheme == "users":
        in_id_order = np.arange(len(ids), dtype=np.int64)
    else:
        tastes = None
        if config.taste_skew > 0:
            tastes = _checked_tastes(user_tastes, len(ids))[by_id]
        in_id_order = _assign_sites(len(ids), num_partitions, config, tastes)
    assignment = np.empty(len(ids), dtype=np.int64)
    assignment[by_id] = in_id_order
    return assignment


def _assign_sites(
    num_users: int, num_sites: int, config: PartitionConfig, tastes: np.ndarray | None
) -> np.ndarray:
    rng = np.random.default_rng(config.seed)
    sizes = rng.permutation(site_sizes(num_users, num_sites, config.size_skew))
    key = rng.random(num_users)
    if tastes is not None:
        by_taste = rng.permutation(num_users)[: round(config.taste_skew * num_users)]
        key[by_taste] = _taste_position(tastes)[by_taste]
    assignment = np.empty(num_users, dtype=np.int64)
    assignment[np.argsort(key, kind="stable")] = np.repeat(np.arange(num_sites), sizes)
    return assignment


def _taste_position(tastes: np.ndarray) -> np.ndarray:
    """Each user's place in the taste order, scaled to [0, 1)."""
    strength = tastes.max(axis=1)
    # A user with no taste at all sorts after every category.
    dominant = np.where(strength > 0, tastes.argmax(axis=1), tastes.shape[1])
    order = np.lexsort((-strength, dominant))  # stable: ties keep id order
    position = np.empty(len(tastes), dtype=np.float64)
    position[order] = np.arange(len(tastes)) / len(tastes)
    return position


def _checked_tastes(user_tastes: np.ndarray | None, num_users: int) -> np.ndarray:
    if user_tastes is None:
        raise ValueError(
            "taste_skew is above 0, so assign_users needs user_tastes (one row per user, "
            "e.g. from user_category_profile)."
        )
    tastes = np.asarray(user_tastes, dtype=np.float64)
    if tastes.ndim != 2 or tastes.shape[0] != num_users or tastes.shape[1] < 1:
        raise ValueError(
            f"user_tastes must have one row per user ({num_users}) and at least one column, "
            f"but its shape is {tastes.shape}."
        )
    if not np.isfinite(tastes).all():
        raise ValueError("user_tastes holds values that are not finite numbers.")
    return tastes


def category_names(catalogue: Catalogue) -> list[str]:
    """The catalogue's categories, sorted: the columns of `user_category_profile`."""
    return sorted({name for cell in catalogue.items["categories"] for name in _categories_of(cell)})


def user_category_profile(
    interactions: pd.DataFrame, catalogue: Catalogue, users: list[str] | None = None
) -> np.ndarray:
    """Each user's share of interactions per catalogue category.

    `interactions` has a `user` column and an `item` column of item-index rows
    (as from `BehaviourWeights.to_interactions`). An interaction with an item
    of several categories counts equally towards each, so a row sums to 1
    (or is all 0 for a user without interactions). Rows follow `users`
    (default: the interactions' users, sorted); columns follow
    `category_names(catalogue)`.
    """
    missing = [column for column in ("user", "item") if column not in interactions.columns]
    if missing:
        raise ValueError(f"The interactions are missing the columns {missing}.")
    user_ids = interactions["user"].astype(str)
    users = sorted(user_ids.unique()) if users is None else [str(user) for user in users]
    names = category_names(catalogue)
    column = {name: j for j, name in enumerate(names)}
    cells = [_categories_of(cell) for cell in catalogue.items["categories"]]
    # Item-by-category membership; an item's categories share its one interaction.
    membership = np.zeros((len(cells), len(names)), dtype=np.float64)
    for row, cell in enumerate(cells):
        for name in cell:
            membership[row, column[name]] += 1.0 / len(cell)
    position = pd.Index(users).get_indexer(user_ids)
    listed = position >= 0
    position = position[listed]
    items = interactions["item"].to_numpy(dtype=np.int64)[listed]
    profile = np.zeros((len(users), len(names)), dtype=np.float64)
    # One pass per category keeps memory at one column, not interactions x categories.
    for j in range(len(names)):
        profile[:, j] = np.bincount(position, weights=membership[items, j], minlength=len(users))
    totals = profile.sum(axis=1, keepdims=True)
    return np.divide(profile, totals, out=np.zeros_like(profile), where=totals > 0)


def _categories_of(cell: object) -> tuple[str, ...]:
    if isinstance(cell, str):
        return tuple(part.strip() for part in cell.split("|") if part.strip())
    if isinstance(cell, (tuple, list, np.ndarray)):
        return tuple(dict.fromkeys(str(name) for name in cell))  # unique, in order
    return ()


def partition_users(
    dataset: Dataset, config: PartitionConfig, weights: BehaviourWeights | None = None
) -> dict[int, list[str]]:
    """Every partition id mapped to its users (sorted by id).

    The users are everyone with an event. Tastes, needed only when
    taste_skew > 0, come from the interactions that `weights` counts.
    """
    users = sorted(dataset.events["user"].astype(str).unique())
    tastes = None
    if config.taste_skew > 0 and config.scheme == "sites":
        interactions = (weights or BehaviourWeights()).to_interactions(
            dataset.events, dataset.catalogue.index
        )
        if not category_names(dataset.catalogue):
            raise ValueError(f"taste-skew = {config.taste_skew} places users by the categories of what they "
                             "interacted with, but this catalogue has no categories (e.g. one built from a given "
                             "split's item ids); set taste-skew = 0.")  # fmt: skip
        tastes = user_category_profile(interactions, dataset.catalogue, users)
    assignment = assign_users(users, config, user_tastes=tastes)
    partitions: dict[int, list[str]] = {p: [] for p in range(config.partitions_for(len(users)))}
    for user, partition in zip(users, assignment.tolist()):
        partitions[partition].append(user)
    return partitions


def users_of_partition(
    dataset: Dataset,
    config: PartitionConfig,
    partition_id: int,
    *,
    weights: BehaviourWeights | None = None,
    assignment: dict[int, list[str]] | None = None,
) -> list[str]:
    """The users of one partition (sorted by id); `assignment` is `partition_users`' answer, if held."""
    partitions = assignment if assignment is not None else partition_users(dataset, config, weights)
    if isinstance(partition_id, bool) or not isinstance(partition_id, (int, np.integer)):
        raise ValueError(f"partition_id must be a whole number, but it is {partition_id!r}.")
    if not 0 <= partition_id < len(partitions):
        raise ValueError(
            f"partition_id {partition_id} is out of range: this config makes {len(partitions)} "
            f"partitions, numbered 0 to {len(partitions) - 1}."
        )
    return partitions[int(partition_id)]


def partition_events(
    dataset: Dataset,
    config: PartitionConfig,
    partition_id: int,
    *,
    weights: BehaviourWeights | None = None,
) -> Dataset:
    """One partition's events, with the full public catalogue every party shares."""
    users = users_of_partition(dataset, config, partition_id, weights=weights)
    mine = dataset.events["user"].astype(str).isin(users)
    return Dataset(
        catalogue=dataset.catalogue,
        events=dataset.events.loc[mine].reset_index(drop=True),
        name=f"{dataset.name}-partition{partition_id}",
    )


def partition_summary(assignment: np.ndarray) -> dict[str, int | float]:
    """Partition sizes at a glance: count, min / median / max users, and their Gini coefficient.

    Gini is 0 when every partition has as many users, and nears 1 when one
    partition holds nearly all of them.
    """
    ids = np.asarray(assignment)
    if ids.size == 0:
        raise ValueError("The assignment is empty, so there are no partitions to summarise.")
    if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0:
        raise ValueError("Partition ids must be whole numbers of at least 0.")
    sizes = np.sort(np.bincount(ids.astype(np.int64)))
    n = len(sizes)
    # Gini of sorted sizes x_1 <= ... <= x_n: sum (2i - n - 1) x_i / (n * sum x).
    gini = float(np.sum((2 * np.arange(1, n + 1) - n - 1) * sizes) / (n * sizes.sum()))
    return {
        "partitions": n,
        "users": int(sizes.sum()),
        "min_size": int(sizes[0]),
        "median_size": float(np.median(sizes)),
        "max_size": int(sizes[-1]),
        "gini": gini,
    }
