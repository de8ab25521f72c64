"""Federation-wide user-level DP under secure aggregation: the coordinator sees only the noisy sum.

`SecureDPStep` extends Flower's FedAvg (its node sampling, evaluation and
logging) and keeps Flower's round loop: `configure_train` runs the first two
SecAgg stages (setup, share-keys) over the Grid it is given and returns the
round's "train" messages (stage 3, masked input); `aggregate_train` runs the
unmask stage over the same Grid, sums, and takes one DP step on the item
tower. A round in which fewer than t sites remain at any stage is aborted
before anything is unmasked: the item tower stays as it was.

What the coordinator holds of a round: each site's public keys, ciphertexts
of shares addressed to other sites, masked vectors (uniform on their own),
the shares of the survivors' self masks and of the dropped sites' mask keys,
and the unmasked sum. The sum is Sum_sites (Sum_users q(g_u) + noise share):
with >= t sites in it, it carries Skellam noise of variance >= (z D2)^2.

The step is post-processing of that sum: divided by the public expected batch
(dp-batch-size) and by the quantization scale (secagg-scale / max-grad-norm),
then SGD at dp-table-lr on the embedding tables and Adam at lr on the dense
layers, as the per-site DP-SGD path does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtower.secure_aggregation.protocol import SecAggAbort, SecAggConfig, SecAggServer, decode_signed

log = logging.getLogger("fedtower.server")

STAGE_KEY = "secagg-stage"
MASKED_KEY = "masked"
TABLE_SUFFIXES = ("id_embedding.weight", "bias.weight")  # trained by SGD, as on the sparse DP path
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


class SecureDPStep(FedAvg):
    """One federation-wide DP step per round, from the secure sum of the sites' integer updates."""

    checks_replies = True  # replies are masked vectors, not item towers: validated here

    def __init__(self, *, threshold: int = 0, l2_units: int, max_grad_norm: float, expected_batch: float,
                 table_lr: float, lr: float, stage_timeout: float, min_available_nodes: int = 1,
                 min_train_nodes: int = 2, fraction_evaluate: float = 1.0,
                 min_evaluate_nodes: int = 1) -> None:  # fmt: skip
        super().__init__(fraction_train=1.0, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=max(2, min_train_nodes), min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=max(2, min_available_nodes))  # fmt: skip
        if threshold < 0 or threshold == 1:
            raise ValueError(f"The secure-aggregation threshold must be 0 (a majority) or at least 2, got {threshold}.")
        if not l2_units >= 1 or not max_grad_norm > 0 or not expected_batch > 0:
            raise ValueError("l2_units, max_grad_norm and expected_batch must be positive.")
        if not table_lr > 0 or not lr > 0:
            raise ValueError("table_lr and lr must be positive.")
        self.threshold = threshold
        self.units_per_gradient = l2_units / max_grad_norm
        self.expected_batch = expected_batch
        self.table_lr, self.lr = table_lr, lr
        self.stage_timeout = stage_timeout
        self.m_t: dict[str, np.ndarray] = {}  # Adam moments of the dense layers (checkpointed by fedtower)
        self.v_t: dict[str, np.ndarray] = {}
        self.steps_taken = 0
        self.grid: Grid | None = None
        self.round: dict | None = None
        self.aborted: list[tuple[int, str]] = []  # (round, why)
        self.noise_std_by_node: dict[int, float] = {}
        self.last_threshold = 0

    def summary(self) -> None:
        log.info("SecureDPStep: federation-wide user-level DP under secure aggregation (SecAgg, AES-CTR masks)")
        t = self.threshold or "a majority of the round's sites"
        log.info("  threshold t = %s; one DP step per round; expected batch %g; %g integer units per unit of "
                 "gradient norm", t, self.expected_batch, self.units_per_gradient)  # fmt: skip

    # ------------------------------------------------------------- stages 1 to 3
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:  # fmt: skip
        self.grid, self.round = grid, None
        request = self.round_request(server_round, arrays)
        if request is None:
            return self._abort(server_round, "the release this round builds on is missing")
        extra, arrays, length = request
        sampled = list(super().configure_train(server_round, arrays, config, grid))
        nodes = sorted(m.metadata.dst_node_id for m in sampled)
        threshold = self.threshold or len(nodes) // 2 + 1
        try:
            secagg = SecAggServer(SecAggConfig(participants=tuple(nodes), threshold=threshold, vector_length=length))
        except ValueError as err:
            return self._abort(server_round, f"cannot run secure aggregation with {len(nodes)} site(s): {err}")
        base = {**dict(config), **extra, "server-round": server_round}
        setup = {**base, STAGE_KEY: "setup", "secagg-participants": [str(n) for n in nodes],
                 "secagg-threshold": threshold, "secagg-length": length}  # fmt: skip
        replies = self._exchange({n: RecordDict({"config": ConfigRecord(setup)}) for n in nodes})
        keys = {n: (r["secagg"]["pk-encryption"], r["secagg"]["pk-mask"]) for n, r in replies.items()}
        try:
            secagg.receive_public_keys(keys)
        except SecAggAbort as err:
            return self._abort(server_round, str(err))
        listed = sorted(keys)
        share = {**base, STAGE_KEY: "share-keys", "secagg-nodes": [str(n) for n in listed],
                 "pk-encryption": [keys[n][0] for n in listed], "pk-mask": [keys[n][1] for n in listed]}  # fmt: skip
        replies = self._exchange({n: RecordDict({"config": ConfigRecord(share)}) for n in listed})
        try:
            routed = secagg.route_shares({n: dict(zip((int(j) for j in r["secagg"]["to"]), r["secagg"]["ciphertexts"]))
                                          for n, r in replies.items()})  # fmt: skip
        except SecAggAbort as err:
            return self._abort(server_round, str(err))
        self.round = {"server_round": server_round, "secagg": secagg, "arrays": arrays, "threshold": threshold,
                      "participants": len(nodes)}  # fmt: skip
        self.last_threshold = threshold
        messages = []
        for node, received in routed.items():
            senders = sorted(received)
            stage = {**base, STAGE_KEY: "masked-input", "from": [str(j) for j in senders],
                     "ciphertexts": [received[j] for j in senders]}  # fmt: skip
            content = RecordDict({"arrays": arrays, "config": ConfigRecord(stage)})
            messages.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def round_request(self, server_round: int, arrays: ArrayRecord) -> tuple[dict, ArrayRecord, int] | None:
        """What this round's masked inputs are: extra config for every stage, the arrays sent with the
        masked-input stage, and the vector length. Here: one DP step on the item tower itself."""
        return {}, arrays, sum(int(np.prod(arrays[k].shape)) for k in arrays.keys())

    def apply_sum(self, server_round: int, arrays: ArrayRecord, total: np.ndarray,
                  survivors: list[int]) -> tuple[ArrayRecord | None, dict]:  # fmt: skip
        """The new item tower from the unmasked (signed) sum, and extra metrics for the round."""
        return self._step(arrays, total), {}

    def _exchange(self, contents: dict[int, RecordDict]) -> dict[int, RecordDict]:
        """One protocol stage: send, wait, keep the replies without error (the others dropped out)."""
        messages = [Message(content=c, dst_node_id=n, message_type=MessageType.TRAIN) for n, c in contents.items()]
        replies = self.grid.send_and_receive(messages, timeout=self.stage_timeout)
        kept = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("Secure aggregation: node %d dropped out (%s).", node, reply.error.reason)
            elif "secagg" not in reply.content:
                log.warning("Secure aggregation: node %d sent no protocol record; treated as dropped.", node)
            else:
                kept[node] = reply.content
        return kept

    def _abort(self, server_round: int, why: str) -> list:
        log.warning("Round %d: secure aggregation aborted before anything was unmasked: %s", server_round, why)
        self.aborted.append((server_round, why))
        self.round = None
        return []

    # ------------------------------------------------------------- stage 4 and the step
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.round is None:
            return None, None
        secagg: SecAggServer = self.round["secagg"]
        masked = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() or MASKED_KEY not in reply.content.get("arrays", {}):
                continue
            vector = reply.content["arrays"][MASKED_KEY].numpy()
            if vector.dtype != np.uint32 or vector.shape != (secagg.config.vector_length,):
                log.warning("Round %d: node %d sent a masked input of shape %s %s; treated as dropped.",
                            server_round, node, vector.shape, vector.dtype)  # fmt: skip
                continue
            masked[node] = vector
            std = reply.content["metrics"].get("secagg-noise-std") if "metrics" in reply.content else None
            if std is not None:
                self.noise_std_by_node[node] = float(std)
        try:
            survivors, dropped = secagg.receive_masked_inputs(masked)
        except SecAggAbort as err:
            self._abort(server_round, str(err))
            return None, None
        base = {"server-round": server_round, STAGE_KEY: "unmask", "secagg-survivors": [str(n) for n in survivors],
                "secagg-dropped": [str(n) for n in dropped]}  # fmt: skip
        replies = self._exchange({n: RecordDict({"config": ConfigRecord(base)}) for n in survivors})
        try:
            total = secagg.aggregate({n: r["secagg"] for n, r in replies.items()})
        except SecAggAbort as err:
            self._abort(server_round, str(err))
            return None, None
        arrays, extra = self.apply_sum(server_round, self.round["arrays"], decode_signed(total), list(survivors))
        log.info("Round %d: secure sum of %d site(s) (%d dropped, t = %d).", server_round,
                 len(survivors), len(dropped), self.round["threshold"])  # fmt: skip
        metrics = MetricRecord({"secagg-sites": len(survivors), "secagg-dropped": len(dropped),
                                "secagg-threshold": self.round["threshold"], **extra})  # fmt: skip
        self.round = None
        return arrays, metrics

    def _step(self, arrays: ArrayRecord, total: np.ndarray) -> ArrayRecord:
        """theta -= lr x (noisy sum / units per gradient) / expected batch, per tensor (post-processing)."""
        gradient = total.astype(np.float64) / (self.units_per_gradient * self.expected_batch)
        self.steps_taken += 1
        out, offset = {}, 0
        beta1, beta2 = ADAM_BETAS
        for key in arrays.keys():
            value = arrays[key].numpy()
            size = value.size
            g = gradient[offset : offset + size].reshape(value.shape)
            offset += size
            if key.endswith(TABLE_SUFFIXES):
                new = value - self.table_lr * g
            else:
                m = beta1 * self.m_t.get(key, np.zeros_like(g)) + (1 - beta1) * g
                v = beta2 * self.v_t.get(key, np.zeros_like(g)) + (1 - beta2) * g * g
                self.m_t[key], self.v_t[key] = m, v
                m_hat = m / (1 - beta1**self.steps_taken)
                v_hat = v / (1 - beta2**self.steps_taken)
                new = value - self.lr * m_hat / (np.sqrt(v_hat) + ADAM_EPS)
            out[key] = Array(np.ascontiguousarray(new.astype(value.dtype)))
        return ArrayRecord(out)

    def noise_table(self) -> str:
        """The noise each site added (std of its Skellam share, in integer units), for the run summary."""
        if not self.noise_std_by_node:
            return ""
        rows = [f"  node {node}: {std:,.1f} integer units = {std / self.units_per_gradient:.4g} x max-grad-norm"
                for node, std in sorted(self.noise_std_by_node.items())]  # fmt: skip
        total = math.sqrt(sum(s * s for s in self.noise_std_by_node.values()))
        rows.append(f"  all {len(rows)} sites together: {total:,.1f} integer units")
        t = self.last_threshold or self.threshold
        if t:
            # The fewest shares in any unmasked sum: what the accountant charges (noise multiplier z).
            least = math.sqrt(t) * min(self.noise_std_by_node.values())
            rows.append(f"  any t = {t} of them: {least:,.1f} integer units = {least / self.units_per_gradient:.4g} "
                        "x max-grad-norm (the noise the accountant charges)")  # fmt: skip
        return "\n".join(rows)
