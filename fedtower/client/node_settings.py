"""A site's own settings: Flower's node config, parsed once and validated.

The node config is the site's, set when its SuperNode starts (`--node-config`);
the run config is the coordinator's. Everything a site's privacy guarantee
depends on lives here, so that no run config can move it: the budget cap, the
largest delta, the noise floor, the accountant, the public population the
sampling rate and delta are planned from, and the opt-ins that release more
than DP allows. A run config may ask for *more* privacy than these allow,
never less: past them the node refuses, naming the node-config key.

Keys are kebab-case like Flower's own (`partition-id`, `num-partitions` are
what Flower's simulation engine sets). An unknown key is an error: a typo in
`max-epsilon` must never leave a site uncapped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from fedtower.data.protocols import SPLITS

ACCOUNTANTS = ("rdp",)
DEFAULT_COUNT_NOISE = 20.0  # std of the DP count of a site's privacy units, when it declares none
DEFAULT_TRAIN_LOCK_TIMEOUT = 600.0
COUNTER_SUFFIX = ".rollback"  # the rollback counter beside the state key file


@dataclass(frozen=True)
class NodeSettings:
    # Where the node's data and private state live.
    data_path: Path | None = None  # deployment: the site's behaviour log (CSV/Parquet file or folder)
    partition_id: int | None = None  # simulation: the partition this node plays
    num_partitions: int | None = None
    state_dir: Path | None = None  # deployment: created once by the site (mkdir -m 700)
    # Evaluation of the node's data, the site's choice over the run config's: `split` (temporal,
    # leave-one-out or none: train on everything), `test-fraction`, `test-path` (the site's own held-out
    # events, e.g. the next period's, with data-path all train), `evaluate = false` to refuse evaluation.
    split: str | None = None
    test_fraction: float | None = None
    test_path: Path | None = None
    evaluate: bool = True
    state_key_file: Path | None = None  # AES key of the state at rest
    # The site's privacy limits.
    max_epsilon: float | None = None  # the site's budget cap, over every run
    max_delta: float | None = None  # the largest delta the site accepts (default: 1 / (10 x population))
    min_noise_multiplier: float = 0.0  # noise floor of every mechanism the site runs
    accountant: str = "rdp"
    # The public number of privacy units the site plans with; without it, a DP count is released.
    dp_population_users: int | None = None
    dp_population_events: int | None = None
    dp_count_noise: float = DEFAULT_COUNT_NOISE  # std of that DP count (sensitivity 1)
    # Opt-ins: each releases or stores something DP alone would not allow. Off by default.
    allow_raw_evaluation: bool = False  # send exact evaluation sums in DP runs (recorded in the ledger)
    allow_plaintext_state: bool = False  # a deployed node without a state key
    # Secure aggregation (federation-wide DP): the site may insist on it, and on how many sites every
    # unmasked sum must hold (its noise share, and the trust it places in the other sites, depend on it).
    require_secure_aggregation: bool = False  # refuse DP rounds whose update would leave unmasked
    min_secagg_threshold: int = 2  # refuse a secure round whose threshold t is below this
    # Rollback protection and concurrency.
    rollback_counter: Path | None = None  # default: beside state-key-file, when there is one
    train_lock_timeout: float = DEFAULT_TRAIN_LOCK_TIMEOUT  # seconds a round waits for another one
    ledger_key: Path | None = None  # Ed25519 PEM that signs the ledger (default: one kept in the state)
    # Compute: torch threads for training and evaluation (default: the cores the process may use, at most 4;
    # in a simulation, the run's client-num-cpus). fedtower.client.threads says why.
    torch_threads: int | None = None
    # Deployment: keep torch and fedtower loaded in one long-lived process per site instead of importing them
    # in every message's fresh ClientApp process (fedtower.client.site_worker says how it is kept private).
    site_worker: bool = False
    site_worker_idle_seconds: float = 600.0  # the worker exits after this long without a message
    # Test-only hooks that break DP on purpose (to check the audits catch them). The ledger of every
    # such round names them, and the audit reports them.
    test_only_insecure_dp_seed: int | None = None  # reproducible DP noise
    test_only_noise_scale: float | None = None  # multiply the DP-SGD noise std by this
    test_only_no_clipping: bool = False  # leave per-sample gradients unclipped
    # Secure-aggregation tests: exit this process (a site that vanishes mid-protocol) at stage N of each
    # secure round (1 setup, 2 share-keys, 3 masked input, 4 unmask), before replying. Breaks no guarantee.
    test_only_secagg_drop: int | None = None
    # ... or hang there (after writing `secagg-stalled` in the state dir) until the process is killed.
    test_only_secagg_stall: int | None = None
    # ... and keep, in state-dir/secagg-inputs/round-<r>.npy, the integer vector this site put under its masks
    # (its users' quantized sum plus its noise share), so a test can check the coordinator's sum against the
    # sites' inputs. The site's own disk only: nothing more is released.
    test_only_secagg_record: bool = False
    raw: Mapping[str, object] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object] | None) -> NodeSettings:
        """Settings from Flower's node config; an unknown key or a bad value is a ValueError naming it."""
        node_config = dict(node_config or {})
        by_key = {f.name.replace("_", "-"): f for f in fields(cls) if f.name != "raw"}
        unknown = sorted(set(node_config) - set(by_key))
        if unknown:
            raise ValueError(
                f"Unknown node-config key(s) {unknown}; a SuperNode of fedtower takes {sorted(by_key)}. "
                "Check the spelling in --node-config: a misspelt privacy limit would not apply."
            )
        values = {by_key[key].name: _parse(key, value) for key, value in node_config.items()}
        return cls(**values, raw=node_config)

    def __post_init__(self) -> None:
        if self.data_path is not None and self.partition_id is not None:
            raise ValueError("Node config has both data-path (deployment) and partition-id (simulation); give one.")
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"Node config key 'split' must be one of {list(SPLITS)}, got {self.split!r}.")
        if self.test_fraction is not None and not 0 < self.test_fraction < 1:
            raise ValueError(f"Node config key 'test-fraction' must be between 0 and 1, got {self.test_fraction}.")
        if self.test_path is not None and (self.data_path is None or self.split is not None):
            raise ValueError("Node config key 'test-path' is a deployed site's own test events: give it with "
                             "data-path (its train events) and without split.")  # fmt: skip
        if self.max_delta is not None and not 0 < self.max_delta < 1:
            raise ValueError(f"Node config key 'max-delta' must be in (0, 1), got {self.max_delta}.")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"Node config key 'accountant' must be one of {ACCOUNTANTS}, got {self.accountant!r}.")
        for key, value in (("dp-population-users", self.dp_population_users),
                           ("dp-population-events", self.dp_population_events)):  # fmt: skip
            if value is not None and value < 1:
                raise ValueError(f"Node config key {key!r} must be a positive integer, got {value}.")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"Node config key 'torch-threads' must be a positive integer, got {self.torch_threads}.")
        if self.site_worker and self.state_dir is None:
            raise ValueError("Node config key 'site-worker' applies to a deployed node (one with state-dir); a "
                             "simulation's clients already live in long-lived Ray workers.")  # fmt: skip
        if self.site_worker and self.test_only_secagg_stall is not None:
            raise ValueError("Node config keys 'site-worker' and 'test-only-secagg-stall' cannot be combined: a "
                             "stalled worker would hold every later message of the site.")  # fmt: skip
        if self.min_secagg_threshold < 2:
            raise ValueError(
                f"Node config key 'min-secagg-threshold' must be at least 2, got {self.min_secagg_threshold}."
            )
        for key, stage in (("test-only-secagg-drop", self.test_only_secagg_drop),
                           ("test-only-secagg-stall", self.test_only_secagg_stall)):  # fmt: skip
            if stage is not None and stage not in (1, 2, 3, 4):
                raise ValueError(f"Node config key {key!r} must be a stage, 1 to 4, got {stage}.")

    # ------------------------------------------------------------------ derived
    @property
    def hooks(self) -> tuple[str, ...]:
        """The active test-only hooks that change the mechanism (the seed is recorded as `randomness`)."""
        active = []
        if self.test_only_noise_scale is not None and self.test_only_noise_scale != 1.0:
            active.append(f"noise-scale={self.test_only_noise_scale:g}")
        if self.test_only_no_clipping:
            active.append("no-clipping")
        return tuple(active)

    @property
    def deployed(self) -> bool:
        """A node whose state dir the site manages (deployment), not one the simulation creates."""
        return self.state_dir is not None

    def declared_population(self, unit: str) -> int | None:
        return self.dp_population_users if unit == "user" else self.dp_population_events

    def population_key(self, unit: str) -> str:
        return "dp-population-users" if unit == "user" else "dp-population-events"

    @property
    def counter_path(self) -> Path | None:
        """Where the rollback counter lives: node config `rollback-counter`, else beside the state key."""
        if self.rollback_counter is not None:
            return self.rollback_counter
        if self.state_key_file is not None:
            return self.state_key_file.with_name(self.state_key_file.name + COUNTER_SUFFIX)
        return None


# ------------------------------------------------------------------ parsing

_PATHS = {"data-path", "test-path", "state-dir", "state-key-file", "rollback-counter", "ledger-key"}
_INTS = {"partition-id", "num-partitions", "dp-population-users", "dp-population-events",
         "test-only-insecure-dp-seed", "min-secagg-threshold", "test-only-secagg-drop",
         "test-only-secagg-stall", "torch-threads"}  # fmt: skip
_POSITIVE = {"test-fraction", "max-epsilon", "max-delta", "dp-count-noise", "train-lock-timeout",
             "test-only-noise-scale", "site-worker-idle-seconds"}
_NON_NEGATIVE = {"min-noise-multiplier"}
_BOOLS = {"evaluate", "allow-raw-evaluation", "allow-plaintext-state", "test-only-no-clipping",
          "require-secure-aggregation", "test-only-secagg-record", "site-worker"}  # fmt: skip


def _parse(key: str, value: object) -> object:
    where = f"Node config key {key!r}"
    if key in _PATHS:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where} must be a path (a non-empty string), got {value!r}.")
        return Path(value).expanduser()
    if key in _INTS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}.")
        if key != "test-only-insecure-dp-seed" and value < 0:
            raise ValueError(f"{where} must not be negative, got {value}.")
        return value
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}.")
        return value
    if key in _POSITIVE | _NON_NEGATIVE:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value!r}.")
        if key in _POSITIVE and not value > 0:
            raise ValueError(f"{where} must be positive, got {value}.")
        if value < 0:
            raise ValueError(f"{where} must not be negative, got {value}.")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r}.")
    return value


def as_node_settings(node: NodeSettings | Mapping[str, object] | None) -> NodeSettings:
    """`node` itself, or the settings of a raw node-config mapping."""
    return node if isinstance(node, NodeSettings) else NodeSettings.from_node_config(node)
