"""Item-tower federation: wraps any Flower strategy, never rewrites its round loop.

The wrapper adds what a two-tower run needs around the inner strategy:
- replies whose arrays are not exactly the item tower (keys, shapes, dtypes)
  or hold NaN/Inf are rejected with a logged reason; the round goes on;
- federated evaluation every `eval_every` rounds, merged exactly from the
  clients' partial sums (a mean over users, never a mean of client means);
- round numbers continue across a resume (`round_offset`);
- an atomic checkpoint of the item tower and the inner strategy's state
  after every round, through a callback.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from fedtower.compression import CODECS, decode_tower
from fedtower.metrics import RankingSums, SampledSums
from fedtower.privacy.dp_evaluation import MARKER as DP_MARKER
from fedtower.privacy.dp_evaluation import NoisyEvaluation

log = logging.getLogger("fedtower.server")

ArraySpec = dict[str, tuple[tuple[int, ...], str]]  # key -> (shape, dtype)
RoundCallback = Callable[[int, ArrayRecord, dict], None]


def strategy_arguments(name: str, **settings) -> dict:
    """The arguments fedtower gives Flower's strategy `name`: sampling, then the strategy's own settings."""
    arguments = {
        "fraction_train": settings.get("fraction_train", 1.0),
        "fraction_evaluate": settings.get("fraction_evaluate", 1.0),
        "min_train_nodes": settings.get("min_train_nodes", 1),
        "min_evaluate_nodes": settings.get("min_evaluate_nodes", 1),
        "min_available_nodes": settings.get("min_available_nodes", 1),
    }
    if name in ("fedadam", "fedyogi"):
        arguments.update(eta=settings.get("server_lr", 0.05), beta_1=settings.get("server_beta_1", 0.9),
                         beta_2=settings.get("server_beta_2", 0.99), tau=settings.get("server_tau", 1e-3))  # fmt: skip
    elif name == "fedavgm":
        arguments.update(server_momentum=settings.get("server_momentum", 0.9))
    elif name == "fedtrimmedavg":
        arguments.update(beta=settings.get("trim_beta", 0.2))
    elif name == "krum":
        arguments.update(num_malicious_nodes=settings.get("krum_byzantine", 1))
    return arguments


STRATEGY_CLASSES = {"fedavg": FedAvg, "fedadam": FedAdam, "fedyogi": FedYogi, "fedavgm": FedAvgM,
                    "fedtrimmedavg": FedTrimmedAvg, "fedmedian": FedMedian, "krum": Krum}  # fmt: skip


def build_inner_strategy(name: str, **settings) -> FedAvg:
    """One of Flower's strategies by run-config name, with fedtower's sampling settings."""
    if name not in STRATEGY_CLASSES:
        raise ValueError(
            f"Unknown strategy {name!r}; choose one of fedavg, fedadam, fedyogi, fedavgm, "
            "fedtrimmedavg, fedmedian, krum."
        )
    return STRATEGY_CLASSES[name](**strategy_arguments(name, **settings))


def arrays_digest(arrays: ArrayRecord) -> str:
    """A short fingerprint of an item tower, so server and clients can show they hold the same one."""
    digest = hashlib.sha256()
    for key in sorted(arrays.keys()):
        array = np.ascontiguousarray(arrays[key].numpy())
        digest.update(f"{key}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def array_spec(arrays: ArrayRecord) -> ArraySpec:
    return {key: (tuple(a.shape), str(a.dtype)) for key, a in arrays.items()}


def reply_bytes(message: Message) -> int:
    """Bytes of the arrays a reply carries (what the site sent, before any decoding), from their shapes and
    dtypes: decoding each array here would copy a whole tower per reply on the aggregation path."""
    return int(sum(np.prod(array.shape) * np.dtype(array.dtype).itemsize for record in message.content.values()
                   if isinstance(record, ArrayRecord) for array in record.values()))  # fmt: skip


def tower_bytes(expected: ArraySpec) -> int:
    return int(sum(np.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in expected.values()))


def reply_problem(message: Message, expected: ArraySpec) -> str | None:
    """Why a training reply cannot be aggregated, or None if it is well formed."""
    content = message.content
    arrays = [record for record in content.values() if isinstance(record, ArrayRecord)]
    if len(arrays) != 1:
        return f"it holds {len(arrays)} ArrayRecords instead of exactly one"
    got = arrays[0]
    if set(got.keys()) != set(expected):
        extra, missing = sorted(set(got.keys()) - set(expected)), sorted(set(expected) - set(got.keys()))
        return f"its arrays are not the item tower (unexpected {extra}, missing {missing})"
    for key, array in got.items():
        shape, dtype = expected[key]
        if tuple(array.shape) != shape or str(array.dtype) != dtype:
            return f"'{key}' has shape {tuple(array.shape)} {array.dtype}, expected {shape} {dtype}"
        if not np.isfinite(array.numpy()).all():
            return f"'{key}' holds NaN or Inf"
    metrics = [record for record in content.values() if isinstance(record, MetricRecord)]
    if len(metrics) != 1:
        return f"it holds {len(metrics)} MetricRecords instead of exactly one"
    weight = metrics[0].get("num-examples")
    if not isinstance(weight, (int, float)) or not weight > 0 or not np.isfinite(weight):
        return f"its 'num-examples' is {weight!r}, not a positive number"
    return None


def in_spec(arrays: ArrayRecord, expected: ArraySpec) -> ArrayRecord:
    """The aggregate in the item tower's own dtypes. Flower's FedAdam/FedYogi return float64 (their step
    size is a NumPy float64), which would make every later checkpoint fail to match the tower on resume."""
    if all(str(arrays[key].dtype) == dtype for key, (_, dtype) in expected.items() if key in arrays):
        return arrays
    return ArrayRecord({key: Array(np.asarray(array.numpy(), dtype=expected[key][1]) if key in expected
                                   else array.numpy()) for key, array in arrays.items()})  # fmt: skip


def strategy_state(inner: Strategy) -> dict[str, np.ndarray]:
    """Server-optimizer state (FedAdam/FedYogi moments, FedAvgM momentum) as named arrays."""
    state: dict[str, np.ndarray] = {}
    for attr in ("m_t", "v_t"):
        for key, value in (getattr(inner, attr, None) or {}).items():
            state[f"{attr}/{key}"] = np.asarray(value)
    for i, value in enumerate(getattr(inner, "momentum_vector", None) or []):
        state[f"momentum_vector/{i}"] = np.asarray(value)
    if hasattr(inner, "checkpoint_state"):  # a strategy with state of its own (the spectral tower's sums)
        state.update(inner.checkpoint_state())
    return state


def restore_strategy_state(inner: Strategy, state: dict[str, np.ndarray]) -> None:
    for attr in ("m_t", "v_t"):
        values = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{attr}/")}
        if values:
            setattr(inner, attr, values)
    momentum = sorted(
        ((int(k.split("/", 1)[1]), v) for k, v in state.items() if k.startswith("momentum_vector/")),
    )
    if momentum:
        inner.momentum_vector = [v for _, v in momentum]
    if hasattr(inner, "load_checkpoint_state"):
        inner.load_checkpoint_state(state)


class FederationFinished(Exception):
    """No client can train any more (e.g. every privacy budget is spent): end the run early."""


class _ExcludingGrid:
    """A view of the Grid without some nodes, so the inner strategy never samples them."""

    def __init__(self, grid: Grid, excluded: set[int]):
        self._grid, self._excluded = grid, excluded

    def get_node_ids(self):
        return [n for n in self._grid.get_node_ids() if n not in self._excluded]

    def __getattr__(self, name):
        return getattr(self._grid, name)


class ItemTowerStrategy(Strategy):
    """Wraps a Flower strategy for two-tower item-tower federation."""

    def __init__(
        self,
        inner: FedAvg,
        *,
        expected_arrays: ArraySpec,
        num_rounds: int,
        eval_every: int = 1,
        round_offset: int = 0,
        seed: int = 0,
        on_round_end: RoundCallback | None = None,
        on_evaluate: Callable[[int, dict], None] | None = None,
        on_ledger: Callable[[int, int, ConfigRecord], str | None] | None = None,
        update_codec: str = "fp32",
    ) -> None:
        if eval_every < 1:
            raise ValueError(f"eval_every must be at least 1, got {eval_every}.")
        if round_offset < 0 or round_offset > num_rounds:
            raise ValueError(f"round_offset must be in [0, {num_rounds}], got {round_offset}.")
        if not expected_arrays:
            raise ValueError("expected_arrays must name the item tower's arrays.")
        if update_codec not in CODECS:
            raise ValueError(f"update_codec must be one of {CODECS}, got {update_codec!r}.")
        self.inner = inner
        self.expected_arrays = expected_arrays
        self.num_rounds = num_rounds
        self.eval_every = eval_every
        self.round_offset = round_offset
        self.seed = seed
        self.on_round_end = on_round_end
        self.on_evaluate = on_evaluate
        self.on_ledger = on_ledger
        self.exhausted: set[int] = set()  # nodes whose privacy budget is spent
        self.current_arrays: ArrayRecord | None = None
        self.round_started = time.perf_counter()
        self.rejected: list[tuple[int, int, str]] = []  # (round, node id, reason)
        self.update_codec = update_codec
        self.received_bytes: list[int] = []  # this round's reply arrays, per accepted site

    def global_round(self, server_round: int) -> int:
        return server_round + self.round_offset

    def summary(self) -> None:
        log.info("ItemTowerStrategy around %s:", type(self.inner).__name__)
        log.info("  rounds %d (starting after round %d), federated evaluation every %d round(s)",
                 self.num_rounds, self.round_offset, self.eval_every)  # fmt: skip
        log.info("  item-tower arrays: %d tensors, %d values", len(self.expected_arrays),
                 sum(int(np.prod(shape)) for shape, _ in self.expected_arrays.values()))  # fmt: skip
        log.info("  replies: %s", "fp32 item towers" if self.update_codec == "fp32"
                 else f"the round's delta in {self.update_codec}")  # fmt: skip
        self.inner.summary()

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        current = self.global_round(server_round)
        self.current_arrays = arrays
        self.round_started = time.perf_counter()
        # Flower samples nodes with the global `random`; seeding per round keeps
        # a run (and its resume) reproducible.
        random.seed(self.seed * 1_000_003 + current)
        if self.exhausted:
            grid = _ExcludingGrid(grid, self.exhausted)
            available = len(grid.get_node_ids())
            needed = max(getattr(self.inner, "min_available_nodes", 1), getattr(self.inner, "min_train_nodes", 1))
            if available == 0 or available < needed:
                raise FederationFinished(
                    f"Only {available} node(s) can still train (the others have spent their privacy "
                    f"budget); ending the run after round {current - 1}."
                )
        return self.inner.configure_train(current, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        current = self.global_round(server_round)
        # An inner strategy whose replies are not item towers (masked vectors) validates them itself.
        inner_checks = getattr(self.inner, "checks_replies", False)
        accepted = []
        for message in replies:
            if message.has_error():
                log.warning("Round %d: node %d failed: %s", current, message.metadata.src_node_id,
                            message.error.reason)  # fmt: skip
                accepted.append(message)  # the inner strategy logs and skips it too
                continue
            node = message.metadata.src_node_id
            refused = self._take_ledger(current, node, message)
            if refused is not None:
                self.rejected.append((current, node, refused))
                log.warning("Round %d: refused the reply of node %d: %s", current, node, refused)
                continue
            metrics_record = message.content.get("metrics")
            if metrics_record is not None and metrics_record.get("budget-exhausted") == 1:
                self.exhausted.add(node)
                log.info("Round %d: node %d has spent its privacy budget and did not train.", current, node)
                continue
            problem, size = None, reply_bytes(message)
            if not inner_checks and self.update_codec != "fp32":
                problem = self._decode_reply(message)
            if problem is None and not inner_checks:
                problem = reply_problem(message, self.expected_arrays)
            if problem is None:
                accepted.append(message)
                self.received_bytes.append(size)
            else:
                self.rejected.append((current, node, problem))
                log.warning("Round %d: rejected the reply of node %d: %s", current, node, problem)
        arrays, metrics = None, None
        if inner_checks:
            arrays, metrics = self.inner.aggregate_train(current, accepted)  # it may abort, or reach sites itself
        elif any(not m.has_error() for m in accepted):
            arrays, metrics = self.inner.aggregate_train(current, accepted)
        else:
            log.warning("Round %d: no usable training reply; the item tower is unchanged.", current)
        if arrays is not None:
            arrays = self.current_arrays = in_spec(arrays, self.expected_arrays)
        if self.on_round_end is not None and self.current_arrays is not None:
            seconds = time.perf_counter() - self.round_started
            traffic = {"sent-bytes-per-site": float(tower_bytes(self.expected_arrays))}
            if self.received_bytes:
                traffic["received-bytes-per-site"] = float(np.mean(self.received_bytes))
            self.on_round_end(current, self.current_arrays,
                              {**dict(metrics or {}), "round-seconds": seconds, **traffic})  # fmt: skip
        self.received_bytes = []
        return arrays, metrics

    def _decode_reply(self, message: Message) -> str | None:
        """Replace a compressed reply's arrays by the tower they stand for; why not, if they cannot be."""
        names = [name for name, record in message.content.items() if isinstance(record, ArrayRecord)]
        if len(names) != 1 or self.current_arrays is None:
            return f"it holds {len(names)} ArrayRecords instead of exactly one"
        base = {key: self.current_arrays[key].numpy() for key in self.expected_arrays}
        received = message.content[names[0]]
        try:
            tower = decode_tower({k: a.numpy() for k, a in received.items()}, base, codec=self.update_codec)
        except ValueError as error:
            return str(error)
        content = message.content
        content[names[0]] = ArrayRecord({key: Array(value.astype(self.expected_arrays[key][1]))
                                         for key, value in tower.items()})  # fmt: skip
        message.content = content
        return None

    # --------------------------------------------------------------- evaluate
    def wants_evaluation(self, current: int) -> bool:
        return current % self.eval_every == 0 or current == self.num_rounds

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        current = self.global_round(server_round)
        if not self.wants_evaluation(current):
            return []
        return self.inner.configure_evaluate(current, arrays, config, grid)

    def _take_ledger(self, current: int, node: int, message: Message) -> str | None:
        """Hand a reply's ledger entry to the server (kept, never aggregated); why to refuse the reply, if so."""
        if "ledger" not in message.content:
            return None
        record = message.content["ledger"]
        del message.content["ledger"]
        return self.on_ledger(current, node, record) if self.on_ledger is not None else None

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Merge the clients' sums exactly (DP noisy sums by addition too), then finalise once."""
        current = self.global_round(server_round)
        exact, noisy, withheld, idle = RankingSums(), NoisyEvaluation(), 0, 0
        sampled = SampledSums()  # exact sums only: a DP reply never carries them
        parts: list[tuple[dict, bool]] = []
        for message in replies:
            node = message.metadata.src_node_id
            if message.has_error():
                log.warning("Round %d: evaluation failed on node %d: %s", current, node,
                            message.error.reason)  # fmt: skip
                continue
            refused = self._take_ledger(current, node, message)
            if refused is not None:
                log.warning("Round %d: refused the evaluation of node %d: %s", current, node, refused)
                continue
            payload = dict(message.content["metrics"])
            if payload.get("evaluation-withheld"):
                idle += int(bool(payload.get("evaluation-refused")))
                withheld += 1
                continue
            parts.append((payload, bool(payload.get(DP_MARKER))))
        any_noisy = any(is_noisy for _, is_noisy in parts)
        for payload, is_noisy in parts:
            try:
                if any_noisy:  # one DP node makes the round's report the DP one: exact sums join as noiseless
                    noisy = noisy + (NoisyEvaluation.from_metrics(payload) if is_noisy else
                                     NoisyEvaluation.exact(RankingSums.from_dict(payload)))  # fmt: skip
                else:
                    exact = exact + RankingSums.from_dict(payload)
                if not is_noisy:
                    sampled = sampled + (SampledSums.from_metrics(payload) or SampledSums())
            except (KeyError, ValueError, TypeError) as err:
                log.warning("Round %d: rejected an evaluation reply: %s", current, err)
        if idle:
            log.info("Round %d: %d node(s) evaluate nothing (node config evaluate = false, or split = none).",
                     current, idle)  # fmt: skip
        if withheld - idle:
            log.info("Round %d: %d node(s) withheld their evaluation (DP budget, or client-level DP).", current,
                     withheld - idle)  # fmt: skip
        if any_noisy and noisy.nodes:
            metrics = {k: v for k, v in noisy.finalize().items() if np.isfinite(v)}
        elif exact.users:
            metrics = {k: v for k, v in exact.finalize().items() if np.isfinite(v)}
        else:
            return None
        if sampled.rows and not any_noisy:
            metrics |= {k: v for k, v in sampled.finalize().items() if np.isfinite(v)}
        if self.on_evaluate is not None:
            self.on_evaluate(current, metrics)
        return MetricRecord(metrics)
