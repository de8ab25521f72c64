"""One DP training round on a client: calibrate, check the budget, train, account, log.

The client owns its budget. Before training it computes the epsilon this
round would reach; past its cap it does not train and says "budget exhausted"
(not an error). The accountant lives in the client's state dir and composes
over every step of every round, across runs and restarts; if it is missing or
unreadable after the client has trained, the client refuses to train.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from fedtower.client.dp_training import DPConfig, DPTrainer, num_dp_samples
from fedtower.client.state import ClientStateStore, StateError
from fedtower.config import RunSettings
from fedtower.data.prepared import UserHistories
from fedtower.models.two_tower import TwoTower
from fedtower.privacy.accounting import ClientAccountant, default_delta, noise_multiplier_for

log = logging.getLogger("fedtower.client")

EPSILON_SLACK = 1e-6  # relative: calibration lands on the target up to float rounding


@dataclass(frozen=True)
class RoundPlan:
    unit: str
    num_samples: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    delta: float
    epsilon_before: float
    epsilon_after: float
    cap: float  # math.inf when uncapped

    @property
    def exhausted(self) -> bool:
        return self.epsilon_after > self.cap * (1 + EPSILON_SLACK)


def load_accountant(state: ClientStateStore) -> ClientAccountant:
    """The persisted accountant; fails closed if a client that trained has lost it."""
    meta = state.load("meta", default={}) or {}
    saved = state.load("accountant", default=None)
    accountant = ClientAccountant()
    if saved is None:
        if int(meta.get("rounds_trained", 0)) > 0:
            raise StateError(
                f"The client in {state.state_dir} has trained {meta['rounds_trained']} round(s) but has no "
                "privacy accountant (it trained without DP, or the accountant was lost). It refuses to "
                "train under DP, since restarting from epsilon = 0 would under-report what was spent."
            )
        return accountant
    try:
        accountant.load_state_dict(saved)
    except (ValueError, KeyError, TypeError) as err:
        raise StateError(f"The privacy accountant in {state.state_dir} is unreadable ({err}); refusing to train.")
    return accountant


def budget_cap(settings: RunSettings, node_config: dict) -> float:
    """The tightest of the site's own max-epsilon, the run's max-epsilon and its target."""
    caps = [float(node_config["max-epsilon"])] if "max-epsilon" in node_config else []
    caps += [v for v in (settings.max_epsilon, settings.target_epsilon) if v > 0]
    return min(caps) if caps else math.inf


def plan_round(
    settings: RunSettings,
    node_config: dict,
    histories: UserHistories,
    accountant: ClientAccountant,
    calibration: dict | None,
) -> tuple[RoundPlan, dict]:
    """What this round will cost; the calibration (noise for the whole run) is made once and kept."""
    unit = settings.privacy_unit
    num_samples = num_dp_samples(unit, histories)
    if num_samples < 1:
        raise ValueError(f"This node has no DP samples at the {unit} level, so it cannot train.")
    sample_rate = min(1.0, settings.dp_batch_size / num_samples)
    steps = max(1, math.ceil(settings.local_epochs / sample_rate))
    delta = settings.target_delta or default_delta(num_samples)
    if calibration is None or calibration.get("run") != settings.run_name:
        if settings.noise_multiplier > 0:
            noise = settings.noise_multiplier
        else:
            planned = steps * settings.num_server_rounds
            noise = noise_multiplier_for(target_epsilon=settings.target_epsilon, target_delta=delta,
                                         sample_rate=sample_rate, steps=planned)  # fmt: skip
        calibration = {"run": settings.run_name, "noise_multiplier": noise, "delta": delta,
                       "sample_rate": sample_rate, "steps_per_round": steps}  # fmt: skip
    noise, delta = float(calibration["noise_multiplier"]), float(calibration["delta"])
    plan = RoundPlan(
        unit=unit,
        num_samples=num_samples,
        sample_rate=sample_rate,
        steps=steps,
        noise_multiplier=noise,
        delta=delta,
        epsilon_before=accountant.epsilon(delta=delta) if accountant.history else 0.0,
        epsilon_after=accountant.epsilon_after(delta=delta, noise_multiplier=noise,
                                               sample_rate=sample_rate, steps=steps),  # fmt: skip
        cap=budget_cap(settings, node_config),
    )
    return plan, calibration


def train_private_round(
    model: TwoTower,
    histories: UserHistories,
    settings: RunSettings,
    plan: RoundPlan,
    accountant: ClientAccountant,
    *,
    seed: int,
    item_optimizer_state: dict | None,
) -> dict:
    """Run the round's DP steps and charge them to the accountant; returns the DP optimizer state."""
    config = DPConfig(
        unit=plan.unit,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        lr=settings.lr,
        user_l2=settings.user_l2,
        positives=settings.dp_positives,
        num_negatives=min(settings.num_negatives, 64),
        history_len=settings.history_len,
        history_dropout=settings.history_dropout,
        seed=seed,
        embedding_path=settings.dp_embedding_path,
        table_optimizer=settings.dp_table_optimizer,
        table_lr=settings.dp_table_lr,
    )
    trainer = DPTrainer(model, config, item_optimizer_state=item_optimizer_state)
    try:
        trainer.run(histories)
    finally:
        trainer.detach()
    accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps)
    return trainer.item_optimizer_state()
