"""What one client node holds: its settings, its local data, its private state.

Resolved fresh for every message (in deployment every message is a new
process), from the run config, the node config and the node's state dir.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fedtower.client.events import EventLog, merge_events
from fedtower.client.node_settings import NodeSettings, as_node_settings
from fedtower.client.state import ClientStateStore
from fedtower.config import RunSettings
from fedtower.data.given import GivenSplit, load_given_split
from fedtower.data.loaders import load_event_log
from fedtower.data.partition import PartitionConfig, partition_events, partition_users, users_of_partition
from fedtower.data.prepared import PreparedSplit, UserHistories, prepare_split
from fedtower.data.protocols import SplitSpec
from fedtower.data.schema import Catalogue, Dataset, empty_events
from fedtower.data.sources import SYNTHETIC, resolve_dataset
from fedtower.data.weights import BehaviourWeights
from fedtower.models.two_tower import TwoTower, TwoTowerConfig
from fedtower.privacy.spectral import SpectralLayout

log = logging.getLogger("fedtower.client")


def cached_dataset(spec: str, order: str = "timestamp") -> Dataset:
    """The (public catalogue + simulated events) dataset; cached per process until its files change
    (a site worker outlives runs, and a site may update its catalogue between them)."""
    return _cached_dataset(spec, _files_fingerprint(spec), order)


def run_dataset(settings: RunSettings) -> Dataset:
    """The run's catalogue and, in a simulation, its events: `data`, or with split = "given" the catalogue
    and the train file's events (the test file is held out)."""
    if settings.split == "given":
        return given_split(settings).dataset
    return cached_dataset(settings.data, settings.event_order)


def given_split(settings: RunSettings) -> GivenSplit:
    """The run's given split (run config train-data + test-data), loaded once per process until a file changes."""
    paths = (settings.data, settings.train_data, settings.test_data)
    return _cached_given(*paths, settings.event_order, tuple(map(_files_fingerprint, paths)))


@functools.lru_cache(maxsize=2)
def _cached_given(data: str, train: str, test: str, order: str, fingerprint: tuple) -> GivenSplit:
    # Without a catalogue folder (data is a synthetic spec) the item ids in the files are the catalogue.
    catalogue = None if data.strip().startswith(SYNTHETIC) else cached_dataset(data).catalogue
    given = load_given_split(Path(train).expanduser(), Path(test).expanduser(), catalogue=catalogue, order=order)
    if given.report.rows_skipped:
        log.warning("Given split validation: %s", given.report.summary(max_issues=5))
    for note in given.notes:
        log.warning("Given split: %s", note)
    return given


def _files_fingerprint(spec: str) -> tuple:
    """(name, mtime, size) of the file or the folder's files `spec` names; () for a generated dataset."""
    path = Path(spec or "").expanduser()
    try:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    except OSError:
        return ()


@functools.lru_cache(maxsize=4)
def _cached_dataset(spec: str, fingerprint: tuple, order: str = "timestamp") -> Dataset:
    dataset, report = resolve_dataset(spec, order=order)
    if report.rows_skipped:
        log.warning("%s", report.summary(max_issues=5))
    return dataset


def partition_config(settings: RunSettings, num_partitions: int) -> PartitionConfig:
    sites = settings.partitioning == "sites"
    return PartitionConfig(
        scheme=settings.partitioning,
        num_partitions=num_partitions,
        size_skew=settings.size_skew if sites else 0.0,
        taste_skew=settings.taste_skew if sites else 0.0,
        seed=settings.partition_seed,
    )


def node_split(settings: RunSettings, node: NodeSettings | Mapping) -> SplitSpec | None:
    """How this node's data is split: the node's own `split` / `test-fraction` over the run config's.
    None: the split is given as files (run config split = "given", or the node's own test-path)."""
    node = as_node_settings(node)
    if node.test_path is not None or (settings.split == "given" and node.split is None):
        return None
    base = settings.split_spec()
    fraction = base.test_fraction if node.test_fraction is None else node.test_fraction
    return replace(base, kind=node.split or base.kind, test_fraction=fraction)


@dataclass
class NodeData:
    """The node's own events, split into local train and test histories as `split.protocol` says."""

    catalogue: Catalogue
    split: PreparedSplit
    source: str

    @property
    def users(self) -> list[str]:
        return self.split.users


def load_node_data(settings: RunSettings, node: NodeSettings | Mapping) -> NodeData:
    """Simulation: a partition of the run's dataset. Deployment: node config `data-path` (and `test-path`)."""
    node = as_node_settings(node)
    spec = node_split(settings, node)
    if node.data_path is not None:
        dataset = cached_dataset(settings.data)
        path = node.data_path
        if node.test_path is not None:  # the site's own held-out events: data-path is all train
            given = load_given_split(path, node.test_path, catalogue=dataset.catalogue, order=settings.event_order)
            if given.report.rows_skipped:
                log.warning("Local data validation: %s", given.report.summary(max_issues=10))
            given.train_events = merge_events(given.train_events, _recorded_events(settings, node, dataset.catalogue))
            return NodeData(dataset.catalogue, given.prepare(), f"{path} + {node.test_path}")
        events, report = load_event_log(path, catalogue=dataset.catalogue, on_error="skip", order=settings.event_order)
        if report.rows_skipped:
            # Unknown items and bad rows are reported, never silently dropped.
            log.warning("Local data validation: %s", report.summary(max_issues=10))
        events = merge_events(events, _recorded_events(settings, node, dataset.catalogue))
        if events.empty:
            raise ValueError(f"The node's data ({path}) holds no valid events.")
        local = Dataset(dataset.catalogue, events, name=str(path))
        return NodeData(dataset.catalogue, prepare_split(local, spec=spec or settings.split_spec()), str(path))
    if node.partition_id is not None:
        partition_id = node.partition_id
        default = settings.num_sites if settings.partitioning == "sites" else 0  # 0: one per user
        num_partitions = node.num_partitions if node.num_partitions is not None else default
        config = partition_config(settings, num_partitions)
        dataset = run_dataset(settings)
        recorded = _recorded_events(settings, node, dataset.catalogue)
        if recorded.empty:
            return _cached_partition(_data_source(settings), spec, config, partition_id)
        # Events recorded while serving are the site's own data: train on them next round.
        local = _partition_dataset(settings, config, partition_id)
        merged = Dataset(local.catalogue, merge_events(local.events, recorded), name=local.name)
        source = f"{settings.data} partition {partition_id}/{config.num_partitions} + event log"
        if spec is None:  # a given split: the recorded events train, the given test rows stay the test
            split = whole_split(settings, None).subset(local.events["user"].astype(str).unique().tolist())
            return NodeData(dataset.catalogue, _with_train(split, merged), source)
        return NodeData(dataset.catalogue, prepare_split(merged, spec=spec), source)
    raise ValueError(
        "This node has neither `data-path` (deployment) nor `partition-id` (simulation) in its "
        "node config, so it has no data to train on."
    )


def _with_train(split: PreparedSplit, dataset: Dataset) -> PreparedSplit:
    """`split` with its train histories rebuilt from `dataset`'s events (same users, same test)."""
    interactions = BehaviourWeights().to_interactions(dataset.events, dataset.catalogue.index)
    train = UserHistories.from_interactions(interactions, split.users)
    return replace(split, train=train)


def _data_source(settings: RunSettings) -> RunSettings:
    """The settings that say what the run's data is (data, a given split's files, event order) and nothing
    else: a hashable key for the caches below that a new run name or learning rate does not miss."""
    return RunSettings(data=settings.data, split="given" if settings.split == "given" else "temporal",
                       train_data=settings.train_data, test_data=settings.test_data,
                       event_order=settings.event_order)  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _cached_partition(settings: RunSettings, spec: SplitSpec | None, config: PartitionConfig,
                      partition_id: int) -> NodeData:  # fmt: skip
    """A simulated node's split (`settings`: its `_data_source`); a Ray worker serves many messages, so
    compute it once. Sized for one-user clients: 610 MovieLens users fit, so each is split once per worker."""
    dataset = run_dataset(settings)
    where = f"{settings.data} partition {partition_id}/{config.num_partitions}"
    users = users_of_partition(dataset, config, partition_id, assignment=_partition_map(settings, config))
    if not users:
        raise ValueError(f"The node's data ({where}) holds no valid events.")
    # Every part of a split is per user, so a partition's split is the whole dataset's, cut to its users:
    # one preparation per process instead of one per partition (610 for one user per client).
    return NodeData(dataset.catalogue, whole_split(settings, spec).subset(users), where)


_whole_splits: dict[tuple, tuple[Dataset, PreparedSplit]] = {}
_partition_maps: dict[tuple, tuple[Dataset, dict[int, list[str]]]] = {}


def _partition_map(settings: RunSettings, config: PartitionConfig) -> dict[int, list[str]]:
    """Every partition's users, computed once per process and dataset: assigning all users costs
    about 60 ms at 20,000 users, which was most of a one-user client's round."""
    dataset = run_dataset(settings)
    key = (_data_source(settings), config)
    held = _partition_maps.get(key)
    if held is None or held[0] is not dataset:
        _partition_maps.clear()
        held = _partition_maps[key] = (dataset, partition_users(dataset, config))
    return held[1]


def whole_split(settings: RunSettings, spec: SplitSpec | None) -> PreparedSplit:
    """The whole run dataset's split (`spec`, or None for the given files), made again when the dataset
    cache reloaded the files. A simulation's server uses it for its references, each client cuts its users."""
    dataset = run_dataset(settings)
    key = (_data_source(settings), spec)
    held = _whole_splits.get(key)
    if held is None or held[0] is not dataset:
        _whole_splits.clear()  # one dataset per run: keep the memory of one
        split = given_split(settings).prepare() if spec is None else prepare_split(dataset, spec=spec)
        held = _whole_splits[key] = (dataset, split)
    return held[1]


def run_split(settings: RunSettings) -> PreparedSplit:
    """The whole run dataset's split under the run config's own split (or its given files)."""
    return whole_split(settings, None if settings.split == "given" else settings.split_spec())


def _partition_dataset(settings: RunSettings, config: PartitionConfig, partition_id: int) -> Dataset:
    local = partition_events(run_dataset(settings), config, partition_id)
    if local.events.empty:
        source = f"{settings.data} partition {partition_id}/{config.num_partitions}"
        raise ValueError(f"The node's data ({source}) holds no valid events.")
    return local


def _recorded_events(settings: RunSettings, node: NodeSettings, catalogue: Catalogue):
    """Events recorded while serving (the state's event log), validated; empty when none."""
    try:
        state_dir, _ = state_dir_of(settings, node)
    except ValueError:
        return empty_events()
    if not any(state_dir.glob("events*.jsonl")):
        return empty_events()
    events, report = EventLog(ClientStateStore.for_node(state_dir, node)).load(catalogue)
    if report.rows_skipped:
        log.warning("Event log validation: %s", report.summary(max_issues=10))
    return events


def state_dir_of(settings: RunSettings, node: NodeSettings | Mapping) -> tuple[Path, bool]:
    """The node's state dir, and whether the client may create it.

    Deployment names it in node config (`state-dir`) and the site creates it
    beforehand, so a missing directory is an error rather than a fresh start.
    Simulation keeps one per partition under the run.
    """
    node = as_node_settings(node)
    if node.state_dir is not None:
        return node.state_dir, False
    if node.partition_id is not None:
        return settings.node_state_dir(node.partition_id), True
    raise ValueError("This node has no `state-dir` in its node config.")


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device=cuda was asked for, but no CUDA device is available here.")
        return torch.device("cuda")
    return torch.device("cpu")


def spectral_layout(settings: RunSettings, catalogue: Catalogue) -> SpectralLayout:
    """Where the spectral tower's blocks sit: public run config and catalogue only, so every party agrees."""
    return SpectralLayout(dim=settings.dim, content_dim=catalogue.num_features)


def model_config(settings: RunSettings, catalogue: Catalogue, num_users: int) -> TwoTowerConfig:
    """The one model shape every party derives from the public catalogue and run config.

    The spectral DP tower (fedtower.privacy.spectral) carries the public content in a block of its id
    table instead of a content MLP, and the user vector's blocks are each of unit length."""
    if settings.spectral:
        layout = spectral_layout(settings, catalogue)
        return TwoTowerConfig(num_items=len(catalogue), num_users=num_users, dim=settings.dim, content_dim=0,
                              pooling=settings.pooling, user_blocks=layout.blocks)  # fmt: skip
    return TwoTowerConfig(
        num_items=len(catalogue),
        num_users=num_users,
        dim=settings.dim,
        content_dim=catalogue.num_features,
        pooling=settings.pooling,
    )


def build_model(settings: RunSettings, catalogue: Catalogue, num_users: int) -> TwoTower:
    config = model_config(settings, catalogue, num_users)
    content = None if catalogue.features is None or not config.content_dim else torch.from_numpy(catalogue.features)
    return TwoTower(config, content)


def load_user_embeddings(model: TwoTower, users: list[str], saved: dict | None) -> None:
    """Put saved private embeddings back by user id; users seen for the first time start at zero."""
    if saved is None or model.user_tower.embedding is None:
        return
    row_of = {user: row for row, user in enumerate(saved["users"])}
    table = saved["embeddings"]
    if table.shape[1] != model.config.dim:
        raise ValueError(
            f"Saved user embeddings have dim {table.shape[1]} but the run uses dim {model.config.dim}."
        )
    weight = model.user_tower.embedding.weight
    with torch.no_grad():
        rows = [(new, row_of[u]) for new, u in enumerate(users) if u in row_of]
        if rows:
            new_rows, old_rows = map(list, zip(*rows, strict=True))
            weight[new_rows] = table[old_rows].to(weight.dtype).to(weight.device)


def user_embeddings_payload(model: TwoTower, users: list[str]) -> dict:
    weight = model.user_tower.embedding.weight.detach().cpu().clone()
    return {"users": list(users), "embeddings": weight}


def serving_meta(settings: RunSettings, node: NodeSettings | Mapping) -> dict:
    """What serving needs to rebuild this node's model and data from its state dir alone.

    Public settings only (the run config and where the node's data lives), kept in meta.
    """
    raw = as_node_settings(node).raw
    keep = ("data-path", "partition-id", "num-partitions")
    return {
        "run_config": settings.to_run_config(),
        "node_config": {k: raw[k] for k in keep if k in raw},
    }
