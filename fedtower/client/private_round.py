"""One DP round on a client: calibrate once per run, check the site's limits and budget, train, account.

The client owns its guarantee. What it may spend and how is set by the site
(`NodeSettings`: max-epsilon, max-delta, min-noise-multiplier, a declared
population); the coordinator's run config may only ask for more privacy.

What is released never depends on the exact number n of the site's privacy
units: the sampling rate q = dp-batch-size / N, the steps per round, delta =
1 / (10 N) and the divisor of the noisy sum (q N) all use a public population
N, either declared by the site (`dp-population-users` / `-events`) or a DP
count (n plus Gaussian noise of std `dp-count-noise`, sensitivity 1, then
shifted up by two stds), released once per run and charged to the accountant. Poisson sampling at rate q is a
valid sampled Gaussian mechanism whatever the true n.

Before it trains, the client computes the ε the round would reach; past its
cap it does not train and says "budget exhausted" (not an error). The
accountant lives in the client's state dir and composes over every release of
every round (DP-SGD steps, DP counts, DP evaluations), across runs and restarts;
if it is missing or unreadable after the client has trained, the client refuses
to train.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch

from fedtower.client.node_settings import NodeSettings
from fedtower.client.state import ClientStateStore, StateError
from fedtower.config import RunSettings
from fedtower.data.prepared import UserHistories
from fedtower.models.two_tower import TwoTower
from fedtower.privacy.accounting import ClientAccountant, HistoryEntry, compose, noise_multiplier_for
from fedtower.privacy.quantization import l1_bound
from fedtower.privacy.secure_random import DPRandom
from fedtower.privacy.skellam import skellam_noise_multiplier_for
from fedtower.privacy.spectral import NUM_CANDIDATES, noise_multipliers, secure_entries, secure_noise_multiplier

log = logging.getLogger("fedtower.client")

EPSILON_SLACK = 1e-6  # relative: calibration lands on the target up to float rounding
CALIBRATION_FORMAT = 2
COUNT_SHIFT = 2.0  # the DP count is published as n + noise + 2 x its std: N >= n but for 2.3% of draws


class PrivacyRefusal(RuntimeError):
    """The run asks for less privacy than this site allows (or for a delta that protects nobody)."""


@dataclass(frozen=True)
class Calibration:
    """A run's public planning numbers at one node, fixed at its first DP release of the run."""

    run: str
    unit: str
    population: int  # public: declared by the site, or a DP count
    population_source: str  # "declared" | "dp-count"
    sample_rate: float
    steps_per_round: int
    batch_divisor: float  # q x population: the expected batch the noisy sum is divided by
    delta: float
    noise_multiplier: float
    eval_noise_multiplier: float
    planned_evaluations: int
    format: int = CALIBRATION_FORMAT
    # "gaussian": this site's own DP-SGD (per-site DP); "skellam": one federation-wide step per round under
    # secure aggregation, whose integer updates have these L2 / L1 bounds (integer units); "spectral": the
    # three Gaussian releases of the spectral item tower, together of multiplier noise_multiplier;
    # "spectral-skellam": the same three releases under secure aggregation (Skellam shares, L2 bound l2_units).
    mechanism: str = "gaussian"
    l2_units: int = 0
    l1_units: float = 0.0

    @property
    def secure(self) -> bool:
        return self.mechanism in ("skellam", "spectral-skellam")

    @property
    def spectral(self) -> bool:
        return self.mechanism in ("spectral", "spectral-skellam")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict | None) -> Calibration | None:
        """A saved calibration; None for none, or for one of an older format (the run re-plans)."""
        if not saved or saved.get("format") != CALIBRATION_FORMAT:
            return None
        return cls(**saved)


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


def budget_cap(settings: RunSettings, node: NodeSettings) -> float:
    """The tightest of the site's own max-epsilon, the run's max-epsilon and its target."""
    caps = [node.max_epsilon] if node.max_epsilon is not None else []
    caps += [v for v in (settings.max_epsilon, settings.target_epsilon) if v > 0]
    return min(caps) if caps else math.inf


def planned_evaluations(settings: RunSettings, node: NodeSettings | None) -> int:
    """DP evaluations this node may be asked for in the run (none when it releases exact sums).
    `node` None: from the run config alone (every evaluation a DP one)."""
    if settings.fraction_evaluate == 0 or (node is not None and node.allow_raw_evaluation):
        return 0
    rounds = settings.num_server_rounds
    return sum(1 for r in range(1, rounds + 1) if r % settings.eval_every == 0 or r == rounds)


# ---------------------------------------------------------------- calibration


def calibrate(
    settings: RunSettings,
    node: NodeSettings,
    histories: UserHistories,
    accountant: ClientAccountant,
    saved: dict | None,
    randomness: DPRandom,
    *,
    vector_length: int = 0,
) -> tuple[Calibration, list[HistoryEntry]]:
    """This run's calibration, and the DP count it must charge now ([] when it has none to release).

    A calibration saved for this run is reused; the site's limits are checked again every
    round (the site may have tightened its node config since).
    """
    from fedtower.client.dp_training import num_dp_samples  # opacus: loaded by DP rounds only

    unit = settings.privacy_unit
    num_samples = num_dp_samples(unit, histories)
    if num_samples < 1:
        raise ValueError(f"This node has no DP samples at the {unit} level, so it cannot train.")
    calibration = Calibration.from_dict(saved)
    count: list[HistoryEntry] = []
    if calibration is not None and calibration.secure != settings.secure_aggregation:
        calibration = None
    if calibration is not None and calibration.spectral != settings.spectral:
        calibration = None
    if calibration is None or calibration.run != settings.run_name or calibration.unit != unit:
        population, source = node.declared_population(unit), "declared"
        if settings.secure_aggregation:
            # One sampling rate for the whole federation: its public size, declared in the run config. A
            # wrong number changes the rate every site samples and charges, not the guarantee.
            population, source = settings.dp_federation_users, "federation-declared"
            calibration = _new_secure_calibration(settings, node, population, vector_length)
        elif population is None:
            # A DP count of the site's privacy units: sensitivity 1, so noise multiplier = its std. Shifted
            # up by two stds (post-processing), so that the default delta 1 / (10 N) stays below 1/n.
            noise = node.dp_count_noise * float(randomness.standard_normal(1, dtype=torch.float64)[0])
            population, source = max(1, round(num_samples + noise + COUNT_SHIFT * node.dp_count_noise)), "dp-count"
            count = [(node.dp_count_noise, 1.0, 1)]
        if calibration is None:
            calibration = _new_calibration(settings, node, accountant, population, source, count)
    check_site_limits(calibration, settings, node, num_samples)
    return calibration, count


def _new_calibration(settings, node, accountant, population, source, count) -> Calibration:
    spectral = settings.spectral
    # The spectral tower's three releases are one Gaussian release (q = 1, one step) of multiplier z,
    # split between them (fedtower.privacy.spectral.noise_multipliers).
    sample_rate = 1.0 if spectral else min(1.0, settings.dp_batch_size / population)
    steps = 1 if spectral else max(1, math.ceil(settings.local_epochs / sample_rate))
    planned_steps = 1 if spectral else steps * settings.num_server_rounds
    delta = settings.target_delta or min(default_delta(population), node.max_delta or 1.0)
    evaluations = planned_evaluations(settings, node)
    eval_noise = settings.dp_eval_noise_multiplier
    if settings.noise_multiplier > 0:
        noise = settings.noise_multiplier
    else:
        # The run's target is reached at its planned end, counting everything already spent, the count
        # and the planned DP evaluations.
        fixed = compose(accountant.history, count + ([(eval_noise, 1.0, evaluations)] if evaluations else []))
        noise = noise_multiplier_for(target_epsilon=settings.target_epsilon, target_delta=delta,
                                     sample_rate=sample_rate, steps=planned_steps, fixed_history=fixed)  # fmt: skip
    return Calibration(run=settings.run_name, unit=settings.privacy_unit, population=int(population),
                       population_source=source, sample_rate=sample_rate, steps_per_round=steps,
                       batch_divisor=max(1.0, sample_rate * population), delta=delta, noise_multiplier=noise,
                       eval_noise_multiplier=eval_noise, planned_evaluations=evaluations,
                       mechanism="spectral" if spectral else "gaussian")  # fmt: skip


def _new_secure_calibration(settings, node, population, vector_length) -> Calibration:
    """The federation-wide plan: every site computes the same numbers from the run config alone (their noise
    shares must add up), so nothing site-specific (its earlier spending, a DP count) enters the noise."""
    if vector_length < 1:
        raise ValueError("A secure-aggregation calibration needs the length of the item-tower vector.")
    sample_rate = min(1.0, settings.dp_batch_size / population)
    # This site's own delta (its ledger's) may be smaller than the plan's, through its max-delta.
    delta = settings.target_delta or min(default_delta(population), node.max_delta or 1.0)
    l2 = settings.secagg_scale
    l1 = l1_bound(l2, vector_length)
    evaluations = planned_evaluations(settings, node)
    eval_noise = settings.dp_eval_noise_multiplier
    if settings.spectral:
        # `vector_length` is the catalogue's size here: the releases' lengths follow from it.
        plan_delta = settings.target_delta or default_delta(population)
        plan_evaluations = planned_evaluations(settings, None)
        fixed = [(eval_noise, 1.0, plan_evaluations)] if plan_evaluations else []
        noise = settings.noise_multiplier or secure_noise_multiplier(
            target_epsilon=settings.target_epsilon, delta=plan_delta, l2_units=l2, num_items=vector_length,
            num_candidates=NUM_CANDIDATES, fixed=fixed)  # fmt: skip
        return Calibration(run=settings.run_name, unit=settings.privacy_unit, population=int(population),
                           population_source="federation-declared", sample_rate=1.0, steps_per_round=1,
                           batch_divisor=1.0, delta=delta, noise_multiplier=noise, eval_noise_multiplier=eval_noise,
                           planned_evaluations=evaluations, mechanism="spectral-skellam", l2_units=l2,
                           l1_units=l1)  # fmt: skip
    if settings.noise_multiplier > 0:
        noise = settings.noise_multiplier
    else:
        # z from the run config alone: a site whose own settings (max-delta, raw evaluation) changed it
        # would add a share of another size, and the sum of t shares would not carry the z every
        # site charges. So plan at the run's delta, with every planned evaluation a DP one.
        plan_delta = settings.target_delta or default_delta(population)
        plan_evaluations = planned_evaluations(settings, None)
        fixed = [(eval_noise, 1.0, plan_evaluations)] if plan_evaluations else []
        noise = skellam_noise_multiplier_for(target_epsilon=settings.target_epsilon, target_delta=plan_delta,
                                             sample_rate=sample_rate, steps=settings.num_server_rounds,
                                             l2_sensitivity=l2, l1_sensitivity=l1, fixed_history=fixed)  # fmt: skip
    return Calibration(run=settings.run_name, unit=settings.privacy_unit, population=int(population),
                       population_source="federation-declared", sample_rate=sample_rate, steps_per_round=1,
                       batch_divisor=max(1.0, sample_rate * population), delta=delta, noise_multiplier=noise,
                       eval_noise_multiplier=eval_noise, planned_evaluations=evaluations, mechanism="skellam",
                       l2_units=l2, l1_units=l1)  # fmt: skip


def skellam_entry(calibration: Calibration, steps: int = 1) -> list:
    """The accountant's entry for `steps` federation-wide Skellam steps of this calibration."""
    return ["skellam", calibration.noise_multiplier, calibration.sample_rate, steps, calibration.l2_units,
            calibration.l1_units]  # fmt: skip


def default_delta(population: int) -> float:
    """δ = 1 / (10 N) for the public population N: strictly below 1/N, and independent of the exact n."""
    return 1.0 / (10 * int(population))


def check_site_limits(calibration: Calibration, settings: RunSettings, node: NodeSettings, num_samples: int) -> None:
    """Refuse, naming the node-config key, a run that asks for less privacy than the site allows."""
    delta = calibration.delta
    largest = node.max_delta if node.max_delta is not None else default_delta(calibration.population)
    if delta > largest * (1 + EPSILON_SLACK):
        key = "max-delta" if node.max_delta is not None else "max-delta (unset: 1 / (10 x population))"
        raise PrivacyRefusal(
            f"The run asks for target-delta = {delta:.3g}, above this site's node config {key} = {largest:.3g}; "
            "refusing to train. The site may raise max-delta in its node config; the run config cannot."
        )
    if delta * num_samples >= 1:
        # Stated without n: the refusal travels to the coordinator.
        raise PrivacyRefusal(
            f"delta = {delta:.3g} is not below 1/n for this site's number of privacy units: such a delta lets "
            "a mechanism publish one unit's data outright. Ask the coordinator for a smaller target-delta."
        )
    for what, noise in (("noise-multiplier", calibration.noise_multiplier),
                        ("dp-eval-noise-multiplier", calibration.eval_noise_multiplier)):  # fmt: skip
        if noise < node.min_noise_multiplier:
            raise PrivacyRefusal(
                f"The run's {what} is {noise:.4g}, below this site's node config min-noise-multiplier = "
                f"{node.min_noise_multiplier:g}; refusing. Ask for more noise (or a smaller target-epsilon)."
            )


# ---------------------------------------------------------------- plans


@dataclass(frozen=True)
class ReleasePlan:
    """What one DP release (a training round or a DP evaluation) will charge, and what ε it reaches."""

    calibration: Calibration
    added: list[HistoryEntry]  # charged when the release goes ahead: the DP count (if any), then its own
    epsilon_after: float  # if it goes ahead
    cap: float  # math.inf when uncapped
    steps: int  # DP-SGD steps (0 for an evaluation)
    own: HistoryEntry  # (noise_multiplier, sample_rate, steps) of the release itself

    @property
    def exhausted(self) -> bool:
        return self.epsilon_after > self.cap * (1 + EPSILON_SLACK)


def plan_release(calibration: Calibration, accountant: ClientAccountant, count: list[HistoryEntry],
                 own: HistoryEntry, cap: float, *, steps: int) -> ReleasePlan:  # fmt: skip
    """What a release of `own` (after the run's DP count, if it is still to be charged) will cost."""
    return ReleasePlan(
        calibration=calibration,
        added=[*count, own],
        epsilon_after=accountant.epsilon_with([*count, own], delta=calibration.delta),
        cap=cap,
        steps=steps,
        own=own,
    )


def plan_training(calibration: Calibration, accountant: ClientAccountant, count: list[HistoryEntry],
                  cap: float) -> ReleasePlan:  # fmt: skip
    if calibration.secure:
        return plan_release(calibration, accountant, count, skellam_entry(calibration), cap, steps=1)
    own = (calibration.noise_multiplier, calibration.sample_rate, calibration.steps_per_round)
    return plan_release(calibration, accountant, count, own, cap, steps=calibration.steps_per_round)


def plan_spectral(calibration: Calibration, accountant: ClientAccountant, count: list[HistoryEntry],
                  cap: float, release: str) -> ReleasePlan:  # fmt: skip
    """One of the spectral tower's three releases: a Gaussian release (q = 1, one step) at its share's
    noise multiplier."""
    own = (noise_multipliers(calibration.noise_multiplier)[release], 1.0, 1)
    return plan_release(calibration, accountant, count, own, cap, steps=1)


def plan_secure_spectral(calibration: Calibration, accountant: ClientAccountant, count: list[HistoryEntry],
                         cap: float, release: str, num_items: int) -> ReleasePlan:  # fmt: skip
    """One of the spectral tower's releases under secure aggregation: one Skellam step (q = 1)."""
    own = secure_entries(calibration.noise_multiplier, l2_units=calibration.l2_units, num_items=num_items,
                         num_candidates=NUM_CANDIDATES)[release]  # fmt: skip
    return plan_release(calibration, accountant, count, own, cap, steps=1)


def plan_evaluation(calibration: Calibration, accountant: ClientAccountant, count: list[HistoryEntry],
                    cap: float) -> ReleasePlan:  # fmt: skip
    own = (calibration.eval_noise_multiplier, 1.0, 1)  # one Gaussian release of the bounded sums
    return plan_release(calibration, accountant, count, own, cap, steps=0)


# ---------------------------------------------------------------- training


def train_private_round(
    model: TwoTower,
    histories: UserHistories,
    settings: RunSettings,
    plan: ReleasePlan,
    *,
    randomness: DPRandom,
    item_optimizer_state: dict | None,
    node: NodeSettings | None = None,
) -> dict:
    """Run the round's DP steps; returns the DP optimizer state. The caller charges `plan.added`
    to the accountant and saves it with what was trained, before anything is released."""
    from fedtower.client.dp_training import DPConfig, DPTrainer  # opacus: loaded by DP rounds only

    calibration = plan.calibration
    config = DPConfig(
        unit=calibration.unit,
        noise_multiplier=calibration.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        sample_rate=calibration.sample_rate,
        steps=calibration.steps_per_round,
        lr=settings.lr,
        user_l2=settings.user_l2,
        positives=settings.dp_positives,
        num_negatives=min(settings.num_negatives, 64),
        history_len=settings.history_len,
        history_dropout=settings.history_dropout,
        embedding_path=settings.dp_embedding_path,
        table_optimizer=settings.dp_table_optimizer,
        table_lr=settings.dp_table_lr,
        batch_divisor=calibration.batch_divisor,
        negative_items=settings.dp_negative_items,
        test_only_noise_scale=(node.test_only_noise_scale or 1.0) if node else 1.0,
        test_only_no_clipping=bool(node and node.test_only_no_clipping),
    )
    if node is not None and node.hooks:
        log.warning("Test-only hooks %s are active: this round is NOT private (the ledger says so).", node.hooks)
    trainer = DPTrainer(model, config, randomness=randomness, item_optimizer_state=item_optimizer_state)
    try:
        trainer.run(histories)
    finally:
        trainer.detach()
    return trainer.item_optimizer_state()
