"""Run configuration: every tunable, its default, and its validation.

The defaults here are the single source of truth; `[tool.flwr.app.config]` in
pyproject.toml repeats them for `flwr run` (a test keeps the two identical).
Keys are Flower's kebab-case run-config keys; values are str, int, float or bool.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from fedtower.data.protocols import EVENT_ORDERS, NEGATIVE_POOLS, SPLITS, SplitSpec

STRATEGIES = ("fedavg", "fedadam", "fedyogi", "fedavgm", "fedtrimmedavg", "fedmedian", "krum")
PARTITIONINGS = ("sites", "users")
DEVICES = ("auto", "cpu", "cuda")
PRIVACY_UNITS = ("user", "interaction")
EMBEDDING_PATHS = ("sparse", "opacus")
EXACT_TABLE_OPTIMIZERS = ("sgd",)  # lazily drawn noise matches dense DP-SGD only for these
OPACUS_TABLE_OPTIMIZERS = ("sgd", "adam")
CLIENT_DP_MODES = ("off", "server-side", "client-side", "poisson")
# How a DP run builds the item tower: "sgd" (DP-SGD rounds) or "spectral" (three Gaussian releases of
# bounded per-user statistics and a tower built from them, fedtower.privacy.spectral).
DP_MECHANISMS = ("sgd", "spectral")
UPDATE_CODECS = ("fp32", "fp16", "int8")  # fedtower.compression.CODECS
SPECTRAL_ROUNDS = 3
RUN_SPLITS = (*SPLITS, "given")


def check_embedding_path(path: str, table_optimizer: str) -> None:
    """Refuse a table optimizer the chosen DP path cannot run exactly."""
    if path not in EMBEDDING_PATHS:
        raise ValueError(f"dp-embedding-path must be one of {EMBEDDING_PATHS}, got {path!r}.")
    if path == "sparse" and table_optimizer not in EXACT_TABLE_OPTIMIZERS:
        raise ValueError(
            f"dp-table-optimizer {table_optimizer!r} cannot be made exact with lazily drawn noise: its "
            "per-row state (momentum, Adam or Adagrad moments, weight decay) would have been moved by the "
            "noise of the steps in which a row was not read. Use dp-table-optimizer = \"sgd\", or "
            "dp-embedding-path = \"opacus\" to add dense noise to every row at every step."
        )
    if path == "opacus" and table_optimizer not in OPACUS_TABLE_OPTIMIZERS:
        raise ValueError(f"dp-table-optimizer must be one of {OPACUS_TABLE_OPTIMIZERS} with "
                         f"dp-embedding-path = \"opacus\", got {table_optimizer!r}.")  # fmt: skip


def _kebab(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class RunSettings:
    # Data and partitioning (public settings; the data itself stays on clients).
    data: str = "synthetic"  # folder, or synthetic[:users=N,items=M,seed=S]
    partitioning: str = "sites"  # sites: N partner sites | users: one user per client
    num_sites: int = 10  # sites when partitioning = sites
    size_skew: float = 0.0  # 0 equal sites; s > 0 sizes them by a power law 1 / rank**s
    taste_skew: float = 0.0  # share of users placed by taste (0 random .. 1 strictly by taste)
    partition_seed: int = 0  # which users go to which site
    # Evaluation split of each client's data: temporal (each user's latest test-fraction held out, the
    # benchmark protocol), leave-one-out (each user's latest interaction; NCF), none (train on everything,
    # no federated evaluation) or given (train-data + test-data files). A node's own `split` or `test-path`
    # in its node config wins over this: the site owns its data.
    split: str = "temporal"
    test_fraction: float = 0.2  # temporal: share of each user's interactions held out
    eval_negatives: int = 99  # leave-one-out: sampled negatives per held-out item (HR@10/NDCG@10; 0: none)
    sampled_k: int = 10  # the cut-off of the metrics against sampled negatives (HR@k, NDCG@k; NCF uses 10)
    negative_pool: str = "interacted"  # leave-one-out negatives: interacted (NCF protocol) or catalogue
    train_data: str = ""  # split = given: the train events (CSV/Parquet); `data` then names the catalogue only
    test_data: str = ""  # split = given: the test rows, user, item[, negatives]
    event_order: str = "timestamp"  # timestamp, or file: events ordered by their place in the files
    # Federation.
    num_server_rounds: int = 10  # federated rounds
    fraction_train: float = 1.0  # share of connected nodes sampled to train each round
    fraction_evaluate: float = 1.0  # share of connected nodes sampled to evaluate
    min_train_nodes: int = 1  # a round waits for at least this many training nodes
    min_evaluate_nodes: int = 1  # ... and evaluating nodes
    min_available_nodes: int = 1  # the run starts when this many nodes are connected
    eval_every: int = 2  # federated evaluation every N rounds (and after the last)
    round_timeout: float = 3600.0  # seconds the server waits for a round's replies
    # Server strategy.
    strategy: str = "fedavg"  # fedavg, fedadam, fedyogi, fedavgm, fedtrimmedavg, fedmedian, krum
    server_lr: float = 0.05  # FedAdam / FedYogi eta
    # FedAdam / FedYogi moments and their adaptivity. Flower's tau of 1e-3 suits updates of that size; a
    # local SGD step's delta is far smaller and needs a tau well below it (1e-8, as Adam's eps).
    server_beta_1: float = 0.9
    server_beta_2: float = 0.99
    server_tau: float = 1e-3
    server_momentum: float = 0.9  # FedAvgM
    trim_beta: float = 0.2  # FedTrimmedAvg: share cut at each end
    krum_byzantine: int = 1  # Krum: tolerated malicious clients
    # Model.
    dim: int = 128  # embedding size of both towers
    pooling: str = "mean"  # how the user tower pools the history: mean or attention
    history_len: int = 200  # the latest N interactions the user tower reads
    # Local training.
    local_epochs: int = 2  # epochs over the local data per round
    batch_size: int = 64  # users per step (non-private training)
    lr: float = 3e-3  # Adam learning rate
    history_dropout: float = 0.5  # share of the history hidden from the user tower in training
    loss: str = "softmax"  # softmax (full catalogue), sampled-softmax (shared negatives) or bpr
    num_negatives: int = 256  # shared negative items per step
    user_l2: float = 1.0  # L2 penalty on the private user embeddings
    keep_item_moments: bool = True  # keep local Adam moments of the item tower between rounds (disk!)
    local_optimizer: str = "adam"  # adam, or sgd (with a server optimizer such as fedadam, for one-user clients)
    # Federated reconstruction (Singhal et al. 2021): before its local training, each client re-solves its
    # users' private vectors for this many epochs with the received item tower frozen (0: off).
    # The local training then updates the item tower only, as in their Algorithm 1.
    reconstruction_epochs: int = 0
    reconstruction_lr: float = 0.0  # Adam learning rate of the reconstruction (0: lr)
    device: str = "auto"  # auto, cpu or cuda
    # Differential privacy on each client (Opacus, RDP accountant). DP is on when
    # noise-multiplier > 0 or target-epsilon > 0.
    privacy_unit: str = "user"  # user: one user's whole history | interaction: one event
    dp_mechanism: str = "sgd"  # sgd: DP-SGD every round | spectral: a DP item tower in three releases
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0  # calibrate the noise once for the planned rounds and epochs
    target_delta: float = 0.0  # 0 -> 1 / (10 x the site's public population); within the site's max-delta
    max_grad_norm: float = 1.0  # per-sample (or per-user) gradient clipping bound
    max_epsilon: float = 0.0  # run-level cap (0 = none); a node's own `max-epsilon` caps it further
    dp_batch_size: int = 16  # expected DP samples per step (Poisson rate = this / samples)
    dp_positives: int = 8  # user unit: positives per user per step
    # Embedding tables under DP: "sparse" draws each row's noise lazily when it is next read
    # (cost grows with the rows a batch touches; SGD only), "opacus" adds dense noise every step.
    dp_embedding_path: str = "sparse"
    dp_table_optimizer: str = "sgd"  # sparse: sgd only (exact); opacus: sgd | adam
    dp_table_lr: float = 0.5
    # Federated evaluation in a DP run: Gaussian noise with this multiplier on six per-user-bounded
    # sums, charged to each node's accountant (a site may opt in to exact sums instead).
    dp_eval_noise_multiplier: float = 20.0
    # DP steps draw their shared negatives from the first N catalogue rows only (0: all of them). Public
    # and data-independent; the empirical audit keeps its canary items (the last rows) out of the pool.
    dp_negative_items: int = 0
    # Secure aggregation with federation-wide DP (user unit): every round is one DP step over the whole
    # federation. Sites Poisson-sample users at rate dp-batch-size / dp-federation-users, quantize each
    # user's clipped item-tower gradient, add their share of Skellam noise, and the coordinator learns only
    # the masked sum of at least secagg-threshold sites (0: a majority of the round's sites).
    secure_aggregation: bool = False
    secagg_threshold: int = 0
    secagg_scale: int = 4096  # integer units per max-grad-norm: the L2 bound of a quantized user update
    dp_federation_users: int = 0  # the public number of users in the whole federation (required)
    # How sites send their trained item tower: fp32 as is, or the round's delta in fp16, or int8 with
    # per-row scales and stochastic rounding (fedtower.compression; under DP applied after the noise).
    update_compression: str = "fp32"
    # Client-level DP for one-user clients: off | server-side | client-side (Flower's wrappers, a fixed sample,
    # no amplification) | poisson (secret Poisson sampling at rate fraction-train, fedtower's RDP accountant).
    client_dp: str = "off"
    client_dp_noise: float = 1.0  # client-level DP noise multiplier
    client_dp_clip: float = 1.0  # client-level DP clipping norm of an update
    seed: int = 0  # model initialisation and non-private training (never DP noise: that is from the OS)
    k: int = 20  # the cut-off of the ranking metrics (NDCG@k, recall@k, ...)
    # Outputs and state.
    output_dir: str = ""  # "" -> ~/.fedtower/runs
    run_name: str = ""  # "" -> a timestamp; reuse a name with resume=true to continue it
    resume: bool = False
    state_root: str = ""  # simulation only: node state dirs ("" -> <run dir>/clients)
    flower_detail: str = "file"  # Flower's INFO lines: "file" (<run dir>/flower.log) or "console" too
    # Simulation resources (read by `fedtower simulate`; `flwr run` takes them from
    # the federation config instead).
    num_supernodes: int = 0  # 0 -> one per partition
    client_num_cpus: float = 1.0  # Ray CPUs per simulated client (also its torch threads)
    client_num_gpus: float = 0.0  # Ray GPUs per simulated client (a fraction shares one GPU)

    def __post_init__(self) -> None:
        self._check_split()
        if self.partitioning not in PARTITIONINGS:
            raise ValueError(f"partitioning must be one of {PARTITIONINGS}, got {self.partitioning!r}.")
        if self.local_optimizer not in ("adam", "sgd"):
            raise ValueError(f"local-optimizer must be 'adam' or 'sgd', got {self.local_optimizer!r}.")
        if self.reconstruction_epochs < 0:
            raise ValueError(f"reconstruction-epochs must be 0 or more, got {self.reconstruction_epochs}.")
        if self.reconstruction_epochs and (self.noise_multiplier > 0 or self.target_epsilon > 0):
            # Refitting the private user rows outside DP-SGD would take them out of the interaction-level
            # guarantee (privacy-findings f3b); DP rounds have no non-private step.
            raise ValueError("reconstruction-epochs applies to non-private runs only; a DP run fits the users' "
                             "vectors inside DP-SGD. Set reconstruction-epochs = 0 or turn DP off.")
        if self.reconstruction_lr < 0:
            raise ValueError(f"reconstruction-lr must be 0 (use lr) or positive, got {self.reconstruction_lr}.")
        for name in ("server_beta_1", "server_beta_2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{_kebab(name)} must be in [0, 1), got {getattr(self, name)}.")
        if not self.server_tau > 0:
            raise ValueError(f"server-tau must be positive, got {self.server_tau}.")
        if self.flower_detail not in ("file", "console"):
            raise ValueError(f"flower-detail must be 'file' or 'console', got {self.flower_detail!r}.")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}.")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}.")
        for name in ("num_sites", "num_server_rounds", "eval_every", "local_epochs", "batch_size",
                     "dim", "history_len", "k", "sampled_k"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{_kebab(name)} must be at least 1, got {getattr(self, name)}.")
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{_kebab(name)} must be between 0 and 1, got {getattr(self, name)}.")
        if self.privacy_unit not in PRIVACY_UNITS:
            raise ValueError(f"privacy-unit must be one of {PRIVACY_UNITS}, got {self.privacy_unit!r}.")
        if self.dp_mechanism not in DP_MECHANISMS:
            raise ValueError(f"dp-mechanism must be one of {DP_MECHANISMS}, got {self.dp_mechanism!r}.")
        if self.dp_mechanism == "spectral":
            if self.num_server_rounds != SPECTRAL_ROUNDS:
                raise ValueError(
                    "dp-mechanism = \"spectral\" builds the item tower in exactly three rounds (a DP item "
                    "histogram, a DP co-occurrence matrix of the head items, a DP choice among three weightings); "
                    f"set num-server-rounds = 3, got {self.num_server_rounds}."
                )
            if self.client_dp != "off":
                raise ValueError("dp-mechanism = \"spectral\" runs per-site DP, or federation-wide DP under "
                                 "secure-aggregation; it does not combine with client-dp.")  # fmt: skip
        if self.client_dp not in CLIENT_DP_MODES:
            raise ValueError(f"client-dp must be one of {CLIENT_DP_MODES}, got {self.client_dp!r}.")
        if self.client_dp != "off" and self.strategy not in ("fedavg", "fedadam", "fedyogi"):
            raise ValueError(f"client-dp needs strategy fedavg, or fedadam / fedyogi stepping from the DP mean; got "
                             f"{self.strategy!r}, whose aggregation changes what one client can move.")  # fmt: skip
        if self.client_dp == "poisson" and not self.fraction_train > 0:
            raise ValueError("client-dp = \"poisson\" samples each client with probability fraction-train: set it "
                             "above 0.")  # fmt: skip
        for name in ("noise_multiplier", "target_epsilon", "target_delta", "max_epsilon"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{_kebab(name)} must be 0 (off) or positive, got {getattr(self, name)}.")
        if self.noise_multiplier > 0 and self.target_epsilon > 0:
            raise ValueError("Give either noise-multiplier or target-epsilon, not both.")
        if not 0 <= self.target_delta < 1:
            raise ValueError(f"target-delta must be in [0, 1), got {self.target_delta}.")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max-grad-norm must be positive, got {self.max_grad_norm}.")
        if self.dp_batch_size < 1 or self.dp_positives < 1:
            raise ValueError("dp-batch-size and dp-positives must be at least 1.")
        check_embedding_path(self.dp_embedding_path, self.dp_table_optimizer)
        if not self.dp_table_lr > 0:
            raise ValueError(f"dp-table-lr must be positive, got {self.dp_table_lr}.")
        if self.dp_negative_items < 0:
            raise ValueError(f"dp-negative-items must be 0 (every item) or positive, got {self.dp_negative_items}.")
        if not self.dp_eval_noise_multiplier > 0:
            raise ValueError(f"dp-eval-noise-multiplier must be positive, got {self.dp_eval_noise_multiplier}.")
        if not 0.0 <= self.taste_skew <= 1.0:
            raise ValueError(f"taste-skew must be between 0 and 1, got {self.taste_skew}.")
        if not self.size_skew >= 0.0:
            raise ValueError(f"size-skew must be non-negative, got {self.size_skew}.")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ValueError(f"trim-beta must be in [0, 0.5), got {self.trim_beta}.")
        if self.secagg_threshold < 0 or self.dp_federation_users < 0:
            raise ValueError("secagg-threshold and dp-federation-users must be 0 (unset) or positive.")
        if not 16 <= self.secagg_scale <= 2**20:
            raise ValueError(f"secagg-scale must be between 16 and 2^20 integer units, got {self.secagg_scale}.")
        if self.secure_aggregation:
            if self.client_dp != "off":
                raise ValueError("secure-aggregation and client-dp are two different DP modes; choose one.")
            if self.privacy_unit != "user":
                raise ValueError("secure-aggregation runs user-level DP only: set privacy-unit = \"user\".")
            if self.dp_embedding_path != "sparse":
                raise ValueError("secure-aggregation computes per-user updates on the sparse path: "
                                 "set dp-embedding-path = \"sparse\".")  # fmt: skip
            if not self.dp_enabled:
                raise ValueError("secure-aggregation runs federation-wide DP: give noise-multiplier or target-epsilon.")
            if self.dp_federation_users < 1:
                raise ValueError("secure-aggregation needs dp-federation-users, the public number of users in "
                                 "the whole federation (the sampling rate is dp-batch-size / "
                                 "dp-federation-users).")  # fmt: skip
            if self.fraction_train != 1.0:
                raise ValueError("secure-aggregation needs fraction-train = 1.0: users are sampled inside the "
                                 "sites, at a rate accounted over the whole federation.")  # fmt: skip
        if self.update_compression not in UPDATE_CODECS:
            raise ValueError(f"update-compression must be one of {UPDATE_CODECS}, got {self.update_compression!r}.")
        if self.update_compression != "fp32" and (self.secure_aggregation or self.client_dp != "off"
                                                  or self.dp_mechanism == "spectral"):  # fmt: skip
            raise ValueError("update-compression applies to item-tower replies: it cannot be combined with "
                             "secure-aggregation, client-dp or dp-mechanism = \"spectral\", whose replies are "
                             "not item towers.")  # fmt: skip
        if self.client_num_gpus < 0 or self.client_num_cpus <= 0:
            raise ValueError("client-num-cpus must be positive and client-num-gpus non-negative.")

    def _check_split(self) -> None:
        if self.split not in RUN_SPLITS:
            raise ValueError(f"split must be one of {RUN_SPLITS}, got {self.split!r}.")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test-fraction must be between 0 and 1, got {self.test_fraction}.")
        if self.eval_negatives < 0:
            raise ValueError(f"eval-negatives must be 0 (none) or more, got {self.eval_negatives}.")
        if self.negative_pool not in NEGATIVE_POOLS:
            raise ValueError(f"negative-pool must be one of {tuple(NEGATIVE_POOLS)}, got {self.negative_pool!r}.")
        if self.event_order not in EVENT_ORDERS:
            raise ValueError(f"event-order must be one of {EVENT_ORDERS}, got {self.event_order!r}.")
        given = bool(self.train_data) or bool(self.test_data)
        if self.split == "given" and not (self.train_data and self.test_data):
            raise ValueError("split = \"given\" needs both train-data and test-data (the two files of the split).")
        if given and self.split != "given":
            raise ValueError(f"train-data and test-data are a given split: set split = \"given\" with them (got "
                             f"split = {self.split!r}).")  # fmt: skip

    def split_spec(self) -> SplitSpec:
        """The run's split as the data layer takes it (not for split = given, which is files)."""
        return SplitSpec("temporal" if self.split == "given" else self.split, test_fraction=self.test_fraction,
                         num_negatives=self.eval_negatives, negative_pool=self.negative_pool,
                         seed=self.seed)  # fmt: skip

    # ------------------------------------------------------------------ mapping
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object] | None) -> RunSettings:
        """Settings from Flower's run config (kebab keys); missing keys take the defaults.

        Unknown keys are an error, so a typo never silently falls back to a default.
        """
        by_key = {_kebab(f.name): f for f in fields(cls)}
        values: dict[str, object] = {}
        unknown = []
        for key, raw in dict(run_config or {}).items():
            spec = by_key.get(key)
            if spec is None:
                unknown.append(key)
                continue
            values[spec.name] = _coerce(key, raw, type(getattr(cls(), spec.name)))
        if unknown:
            raise ValueError(unknown_keys_message("run-config", unknown, by_key))
        return cls(**values)

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        return {_kebab(f.name): getattr(self, f.name) for f in fields(self)}

    # ------------------------------------------------------------------ derived
    @property
    def dp_enabled(self) -> bool:
        return self.noise_multiplier > 0 or self.target_epsilon > 0

    @property
    def spectral(self) -> bool:
        """A DP run whose item tower is the spectral one (no DP-SGD)."""
        return self.dp_enabled and self.dp_mechanism == "spectral"

    @property
    def run_dir(self) -> Path:
        root = Path(self.output_dir).expanduser() if self.output_dir else Path.home() / ".fedtower" / "runs"
        return (root / (self.run_name or "run")).resolve()

    def node_state_dir(self, partition_id: int) -> Path:
        root = Path(self.state_root).expanduser() if self.state_root else self.run_dir / "clients"
        return (root / f"partition-{partition_id:05d}").resolve()


def unknown_keys_message(kind: str, unknown: list[str], known) -> str:
    """Name each unknown key with the closest known one (a typo is the usual cause)."""
    parts = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
        parts.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    return (f"Unknown {kind} keys: {', '.join(parts)}. Every key, with its default, is in docs/configuration.md "
            "(`fedtower config keys` prints them).")


def _coerce(key: str, raw: object, kind: type) -> object:
    """Flower gives TOML values; accept an int where a float is expected, nothing looser."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
    elif kind is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
    elif kind is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
    elif isinstance(raw, kind):
        return raw
    raise ValueError(f"Run-config key {key!r} must be a {kind.__name__}, got {raw!r}.")


DEFAULT_RUN_CONFIG: dict[str, str | int | float | bool] = RunSettings().to_run_config()

