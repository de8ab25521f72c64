"""One training run with canaries, audited: the empirical lower bound next to the epsilon the ledger claims.

A DP site trains through the client's real handlers (`train_on_node`, the same
calibration, accountant, ledger and secure noise as a deployed node) for a few
rounds on synthetic data plus canaries; the auditor then sees only what the
coordinator sees, the item tower sent and the towers released, and bounds
epsilon from them (fedtower.privacy.empirical_audit). Test-only hooks in the
site's node config break the run on purpose: `noise-scale` (the DP noise
multiplied by it), `no-clipping`; the ledger names them, and the claimed
epsilon stays what an honest run would claim.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtower.client.handlers import train_on_node
from fedtower.client.local import run_dataset
from fedtower.config import RunSettings
from fedtower.data.synthetic import SyntheticConfig, generate, to_folder
from fedtower.privacy.empirical_audit import add_canaries, bias_scores, guess_and_bound
from fedtower.privacy.ledger import LedgerEntry
from fedtower.server.federation import initial_item_tower
from fedtower.simulations.in_process import task_identity


@dataclass
class AuditConfig:
    unit: str = "user"  # user | interaction
    target_epsilon: float = 4.0
    canaries: int = 500
    guesses_per_side: int = 50  # k: "in" for the k highest scores, "out" for the k lowest
    users: int = 300
    items: int = 200
    rounds: int = 5
    local_epochs: int = 2
    dp_batch_size: int = 64
    dim: int = 16
    dp_table_lr: float = 5.0
    # A small clipping bound: a canary's unclipped gradient (about 1) is then 10x what DP lets through,
    # so an audit sees clipping switched off; the noise scales with it, so nothing else changes.
    max_grad_norm: float = 0.1
    target_delta: float = 1e-5
    confidence: float = 0.95
    noise_scale: float | None = None  # test-only hook: the DP noise multiplied by this
    no_clipping: bool = False  # test-only hook
    data_seed: int = 0  # the synthetic base data (public); the canaries' coin flips are secret

    @property
    def hooks(self) -> dict:
        hooks = {}
        if self.noise_scale is not None:
            hooks["test-only-noise-scale"] = self.noise_scale
        if self.no_clipping:
            hooks["test-only-no-clipping"] = True
        return hooks


@dataclass
class AuditResult:
    config: dict
    claimed_epsilon: float
    delta: float
    lower_bound: float
    guesses: int
    correct: int
    canaries_in: int
    hooks: list[str]
    seconds: float
    scores_in_mean: float = 0.0
    scores_out_mean: float = 0.0
    ledger: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("ledger")
        return out


def run_audit(config: AuditConfig, workdir: str | Path | None = None) -> AuditResult:
    """Train one DP site with canaries for `config.rounds` rounds, then bound epsilon from its towers."""
    started = time.perf_counter()
    root = Path(workdir or tempfile.mkdtemp(prefix="fedtower-audit-"))
    base = generate(SyntheticConfig(num_users=config.users, num_items=config.items, seed=config.data_seed))
    canaries = add_canaries(base, config.canaries, config.unit)
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    to_folder(canaries.dataset, data_dir)
    state_dir = root / "state"
    state_dir.mkdir(mode=0o700, exist_ok=True)
    run_name = f"audit-{config.unit}"
    settings = RunSettings(data=str(data_dir), partitioning="sites", num_sites=1, dim=config.dim,
                           num_server_rounds=config.rounds, local_epochs=config.local_epochs,
                           privacy_unit=config.unit, target_epsilon=config.target_epsilon,
                           target_delta=config.target_delta, dp_batch_size=config.dp_batch_size,
                           dp_table_lr=config.dp_table_lr, max_grad_norm=config.max_grad_norm,
                           fraction_evaluate=0.0, history_len=30,
                           num_negatives=32, dp_negative_items=config.items,  # canary items: never negatives
                           output_dir=str(root / "runs"), run_name=run_name)  # fmt: skip
    run_config = settings.to_run_config()
    population = {"user": "dp-population-users", "interaction": "dp-population-events"}[config.unit]
    users = canaries.dataset.events["user"].nunique()
    declared = users if config.unit == "user" else len(canaries.dataset.events)
    node_config = {"partition-id": 0, "num-partitions": 1, "state-dir": str(state_dir),
                   "allow-plaintext-state": True, population: int(declared), "max-delta": config.target_delta,
                   **config.hooks}  # fmt: skip
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)
    initial = initial_item_tower(settings)
    tower, ledger = initial, []
    with task_identity(node_id=7):
        for server_round in range(1, config.rounds + 1):
            message = Message(content=RecordDict({"arrays": tower, "config": ConfigRecord(
                {"server-round": server_round, "run-name": run_name})}), dst_node_id=7, message_type="train")
            reply = train_on_node(message, context)
            entry = LedgerEntry.from_config_record(reply.content["ledger"])
            ledger.append(entry.to_dict())
            if entry.status != "trained":
                break
            tower = reply.content["arrays"]  # one site: its tower is the aggregate
    catalogue = run_dataset(settings).catalogue  # the rows as the run loaded them
    scores = bias_scores({k: v.numpy() for k, v in initial.items()}, {k: v.numpy() for k, v in tower.items()},
                         catalogue, canaries.items)  # fmt: skip
    final = LedgerEntry.from_dict(ledger[-1])
    guesses = guess_and_bound(scores, canaries.included, k=config.guesses_per_side, delta=final.delta,
                              confidence=config.confidence)  # fmt: skip
    return AuditResult(config=asdict(config), claimed_epsilon=final.epsilon_after, delta=final.delta,
                       lower_bound=guesses.lower_bound, guesses=guesses.guesses, correct=guesses.correct,
                       canaries_in=int(canaries.included.sum()), hooks=list(final.hooks),
                       seconds=time.perf_counter() - started,
                       scores_in_mean=float(np.mean(scores[canaries.included])) if canaries.included.any() else 0.0,
                       scores_out_mean=float(np.mean(scores[~canaries.included])) if (~canaries.included).any()
                       else 0.0, ledger=ledger)  # fmt: skip
