"""A site's side of a secure-aggregation round with federation-wide DP (run config secure-aggregation).

A round is four messages from the coordinator, all of Flower type "train",
told apart by the config key `secagg-stage`:

1. setup: the round's participants and threshold t; the site makes its key
   pairs and sends the two public keys.
2. share-keys: every participant's public keys; the site Shamir-shares its
   self-mask seed and mask key and sends each other site its shares,
   encrypted to that site (the coordinator only routes ciphertexts).
3. masked-input: the global item tower and the shares sent to this site. The
   site runs one DP step's share (Poisson-sampled users, each user's clipped
   item-tower gradient quantized to integers of L2 norm <= secagg-scale,
   summed, plus Skellam noise of variance (z secagg-scale)^2 / t), charges its
   accountant with the federation-wide mechanism, and sends the masked vector
   and its signed ledger entry. Only the sum of >= t sites can be unmasked.
4. unmask: who survived; the site sends its shares of the survivors' self
   masks and of the dropped sites' mask keys (never both for one site).

The secrets between stages live in the site's own state dir (component
"secagg", encrypted with the state key when the site has one), never in
Flower's Context (which a deployment may keep elsewhere). A site sends one
masked input per round: a second would let the coordinator subtract two
inputs under the same masks.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtower.client.local import load_user_embeddings, pick_device, spectral_layout, user_embeddings_payload
from fedtower.client.node_settings import NodeSettings
from fedtower.client.private_round import PrivacyRefusal, plan_secure_spectral, plan_training
from fedtower.client.spectral_round import (
    CANDIDATES_KEY,
    HEAD_KEY,
    RELEASE_KEY,
    checked_candidates,
    checked_head,
    selection_per_user,
    statistics_histories,
)
from fedtower.config import RunSettings
from fedtower.privacy.ledger import signed_to_config_record
from fedtower.privacy.quantization import clip_coordinates, quantize_and_sum, site_range
from fedtower.privacy.skellam import skellam_noise
from fedtower.privacy.spectral import per_user_entries, sensitivity, upper_size
from fedtower.secure_aggregation.protocol import SecAggConfig, SecAggSite, encode_signed

if TYPE_CHECKING:
    from fedtower.client.dp_training import DPConfig

log = logging.getLogger("fedtower.client")

STAGE_KEY = "secagg-stage"
STAGES = {"setup": 1, "share-keys": 2, "masked-input": 3, "unmask": 4}
MASKED_KEY = "masked"


class SecAggDropout(RuntimeError):
    """Test-only: this site vanishes at a stage of the protocol (node config test-only-secagg-drop)."""


def trust_assumptions(threshold: int, participants: int) -> str:
    """What a secure round's guarantee against the coordinator rests on (recorded in the ledger)."""
    return (f"secure-aggregation (SecAgg, AES-CTR masks); every unmasked sum holds >= {threshold} of "
            f"{participants} sites' noise shares; honest-but-curious coordinator; sites do not collude "
            "with it")  # fmt: skip


def noise_share_mu(noise_multiplier: float, l2_units: int, threshold: int) -> float:
    """Each site's Skellam parameter: t shares sum to Sk(mu, mu) with variance 2 mu = (z D2)^2."""
    return (noise_multiplier * l2_units) ** 2 / (2 * threshold)


def secure_train(message: Message, context: Context, settings: RunSettings, node: NodeSettings, state) -> Message:
    config: ConfigRecord = message.content["config"]
    stage = str(config.get(STAGE_KEY, ""))
    if stage not in STAGES:
        raise ValueError(f"A secure-aggregation round needs config {STAGE_KEY!r} in {sorted(STAGES)}, got {stage!r}.")
    server_round = int(config.get("server-round", 0))
    if node.test_only_secagg_drop == STAGES[stage]:
        raise SecAggDropout(f"test-only-secagg-drop: this site drops out at stage {stage} of round {server_round}.")
    if node.test_only_secagg_stall == STAGES[stage]:
        (state.state_dir / "secagg-stalled").write_text(f"{stage} {server_round}\n")
        log.warning("test-only-secagg-stall: hanging at stage %s of round %d until killed.", stage, server_round)
        while True:
            time.sleep(60)
    if stage == "setup":
        content = _setup(config, context, settings, node, state, server_round)
    elif stage == "share-keys":
        content = _share_keys(config, context, settings, state, server_round)
    elif stage == "masked-input":
        content = _masked_input(message, config, context, settings, node, state, server_round)
    else:
        content = _unmask(config, context, settings, state, server_round)
    return Message(content=content, reply_to=message)


# ---------------------------------------------------------------- stages


def _setup(config, context, settings, node, state, server_round) -> RecordDict:
    participants = tuple(sorted(int(n) for n in config["secagg-participants"]))
    threshold = int(config["secagg-threshold"])
    length = int(config["secagg-length"])
    if threshold < node.min_secagg_threshold:
        raise PrivacyRefusal(
            f"The round's secure-aggregation threshold is {threshold} sites, below this site's node config "
            f"min-secagg-threshold = {node.min_secagg_threshold}: refusing (its noise share assumes at least that "
            "many sites in every sum)."
        )
    if context.node_id not in participants:
        raise ValueError("This node is not among the round's secure-aggregation participants.")
    site = SecAggSite(SecAggConfig(participants=participants, threshold=threshold, vector_length=length),
                      context.node_id)  # fmt: skip
    keys = site.setup()
    _save(state, settings, server_round, site, masked=False)
    return RecordDict({"secagg": ConfigRecord({"pk-encryption": keys["encryption"], "pk-mask": keys["mask"]})})


def _share_keys(config, context, settings, state, server_round) -> RecordDict:
    site, _ = _load(state, settings, server_round, "share-keys")
    nodes = [int(n) for n in config["secagg-nodes"]]
    public_keys = dict(zip(nodes, zip(config["pk-encryption"], config["pk-mask"])))
    ciphertexts = site.share_keys(public_keys)
    _save(state, settings, server_round, site, masked=False)
    to = sorted(ciphertexts)
    record = ConfigRecord({"to": [str(n) for n in to], "ciphertexts": [ciphertexts[n] for n in to]})
    return RecordDict({"secagg": record})


def _unmask(config, context, settings, state, server_round) -> RecordDict:
    site, _ = _load(state, settings, server_round, "unmask")
    survivors = [int(n) for n in config["secagg-survivors"]]
    dropped = [int(n) for n in config.get("secagg-dropped", [])]
    shares = site.unmask(survivors, dropped)
    _save(state, settings, server_round, site, masked=True)
    return RecordDict({"secagg": ConfigRecord(shares_to_config(shares))})


def _masked_input(message, config, context, settings, node, state, server_round) -> RecordDict:
    # Imported here: handlers imports this module.
    from fedtower.client.handlers import _next_meta, commit_refusal, open_round

    site, masked_before = _load(state, settings, server_round, "masked-input")
    if masked_before:
        raise PrivacyRefusal("This site already sent its masked input for this round; a second one under the "
                             "same masks would let the coordinator subtract the two. Refusing.")  # fmt: skip
    received = dict(zip((int(n) for n in config.get("from", [])), config.get("ciphertexts", [])))
    threshold, participants = site.config.threshold, len(site.config.participants)
    # What is summed: one spectral release of item statistics, or one DP-SGD step's clipped user gradients.
    plan_input, integer_total = (_plan_spectral, _spectral_total) if settings.spectral else (_plan_step, _step_total)
    with state.round_lock(node.train_lock_timeout):
        data, model, global_snapshot, meta = open_round(message, settings, node, state)
        length = site.config.vector_length
        round_, plan = plan_input(settings, node, state, data, context, server_round, meta, model, config, length)
        calibration = round_.calibration
        trust = trust_assumptions(threshold, participants)
        if plan.exhausted:
            record = commit_refusal(round_, plan, message, server_round, data, global_snapshot,
                                    what="this masked input", added=[], trust=trust)  # fmt: skip
            metrics = MetricRecord({"num-examples": 1, "budget-exhausted": 1})
            return RecordDict({"metrics": metrics, "ledger": signed_to_config_record(record)})
        model.to(pick_device(settings.device))
        total, noise_multiplier = integer_total(settings, node, state, data, model, config, message, round_, plan)
        model.cpu()
        if total.numel() != length:
            raise ValueError(f"The round's vector length {length} is not the size of this node's masked input "
                             f"({total.numel()}).")  # fmt: skip
        mu = noise_share_mu(noise_multiplier, calibration.l2_units, threshold)
        mu *= (node.test_only_noise_scale or 1.0) ** 2
        noise_std = math.sqrt(2 * mu)
        bound = site_range(num_sites=participants, noise_std=noise_std)
        noise = skellam_noise(round_.randomness.spawn("skellam"), mu=mu, size=length)
        share = clip_coordinates(total, bound).numpy() + noise
        if node.test_only_secagg_record:
            _record_input(state, server_round, share)
        masked = site.masked_input(encode_signed(share), received)
        entry = round_.entry(plan, status="trained", added=plan.added, mechanism="skellam", trust=trust,
                             release="item-statistics" if settings.spectral else "")  # fmt: skip
        components = {
            "users": user_embeddings_payload(model, data.users),
            "item_tower": global_snapshot,
            "meta": _next_meta(round_.meta, message, server_round, data.source),
            "secagg": _state_payload(settings, server_round, site, masked=True),
        }
        record = round_.commit(components, plan.added, entry)
    # The noise share's size is public (it follows from the run config and t); nothing here depends on the data.
    metrics = MetricRecord({"num-examples": 1, "budget-exhausted": 0, "secagg-noise-std": noise_std})
    return RecordDict({"arrays": ArrayRecord({MASKED_KEY: Array(masked)}), "metrics": metrics,
                       "ledger": signed_to_config_record(record)})  # fmt: skip


def _plan_step(settings, node, state, data, context, server_round, meta, model, config, length):
    """A DP-SGD step's masked input: the item tower's gradient sum, calibrated for the run's planned steps."""
    from fedtower.client.handlers import _PrivateRound

    if length != sum(value.numel() for value in model.item_tower_state().values()):
        raise ValueError(f"The round's vector length {length} is not this node's item tower's size.")
    round_ = _PrivateRound(settings, node, state, data, context, server_round, meta, vector_length=length)
    return round_, plan_training(round_.calibration, round_.accountant, round_.count, round_.cap)


def _step_total(settings, node, state, data, model, config, message, round_, plan) -> tuple[torch.Tensor, float]:
    from fedtower.client.dp_training import DPTrainer  # opacus: loaded by DP rounds only

    load_user_embeddings(model, data.users, state.load("users", default=None))
    trainer = DPTrainer(model, _step_config(settings, round_.calibration, node),
                        randomness=round_.randomness.spawn("sgd"))  # fmt: skip
    try:
        total, _batch = trainer.integer_user_sum(data.split.train, keys=list(model.item_tower_state()),
                                                 l2_bound=round_.calibration.l2_units)  # fmt: skip
    finally:
        trainer.detach()
    return total, round_.calibration.noise_multiplier


def _plan_spectral(settings, node, state, data, context, server_round, meta, model, config, length):
    """One spectral release's masked input: calibrated from the catalogue's size (the releases' lengths)."""
    from fedtower.client.handlers import _PrivateRound

    release = str(config.get(RELEASE_KEY, ""))
    round_ = _PrivateRound(settings, node, state, data, context, server_round, meta,
                           vector_length=model.config.num_items)  # fmt: skip
    plan = plan_secure_spectral(round_.calibration, round_.accountant, round_.count, round_.cap, release,
                                model.config.num_items)  # fmt: skip
    return round_, plan


def _spectral_total(settings, node, state, data, model, config, message, round_, plan) -> tuple[torch.Tensor, float]:
    release = str(config.get(RELEASE_KEY, ""))
    total = integer_spectral_sum(release, settings, data.split.train, model, spectral_layout(settings, data.catalogue),
                                 config, message.content["arrays"], l2_units=round_.calibration.l2_units,
                                 randomness=round_.randomness.spawn("quantize"))  # fmt: skip
    return total, plan.own[1]


def integer_spectral_sum(release: str, settings: RunSettings, train, model, layout, config, arrays, *,
                         l2_units: int, randomness) -> torch.Tensor:  # fmt: skip
    """The site's share of one spectral release before noise: each user's contribution scaled so that its
    sensitivity is `l2_units` integer units, quantized with a hard L2 bound, summed (int64)."""
    unit = settings.privacy_unit
    num_items = model.config.num_items
    head, per_user = None, None
    if release == "histogram":
        histories, length = statistics_histories(train, unit), num_items
    elif release == "cooccurrence":
        head = checked_head(config.get(HEAD_KEY), num_items)
        histories, length = statistics_histories(train, unit), upper_size(len(head))
    else:
        candidates = checked_candidates(config.get(CANDIDATES_KEY))
        per_user = selection_per_user(model, layout, train, candidates, arrays, k=settings.k,
                                      history_len=settings.history_len)  # fmt: skip
        histories, length = train, len(candidates)
    bound = sensitivity(release, unit, num_candidates=len(per_user[0]) if per_user is not None else 1)
    users, coords, values = per_user_entries(release, histories, unit=unit, head=head, per_user=per_user)
    scaled = torch.from_numpy(values * (l2_units / bound))
    uniforms = torch.from_numpy(randomness.uniform(len(values)))
    return quantize_and_sum(torch.from_numpy(users), torch.from_numpy(coords), scaled, uniforms,
                            batch=len(histories), length=length, l2_bound=l2_units)  # fmt: skip


def _step_config(settings: RunSettings, calibration, node: NodeSettings) -> DPConfig:
    from fedtower.client.dp_training import DPConfig

    if node.test_only_no_clipping:
        raise ValueError("test-only-no-clipping is not supported under secure aggregation.")
    return DPConfig(unit="user", noise_multiplier=calibration.noise_multiplier, max_grad_norm=settings.max_grad_norm,
                    sample_rate=calibration.sample_rate, steps=1, lr=settings.lr, user_l2=settings.user_l2,
                    positives=settings.dp_positives, num_negatives=min(settings.num_negatives, 64),
                    history_len=settings.history_len, history_dropout=settings.history_dropout,
                    embedding_path="sparse", table_lr=settings.dp_table_lr,
                    batch_divisor=calibration.batch_divisor, negative_items=settings.dp_negative_items)  # fmt: skip


# ---------------------------------------------------------------- the round's secrets, on disk


def _record_input(state, server_round: int, share) -> None:
    """Test-only (node config test-only-secagg-record): keep this round's pre-mask input on the site's disk."""
    folder = state.state_dir / "secagg-inputs"
    folder.mkdir(exist_ok=True)
    np.save(folder / f"round-{server_round}.npy", np.asarray(share, dtype=np.int64))


def _state_payload(settings: RunSettings, server_round: int, site: SecAggSite, *, masked: bool) -> dict:
    secrets = {k: base64.b64encode(v).decode() for k, v in site.state_dict().items()}  # every field is bytes
    return {"run": settings.run_name, "round": server_round, "masked": masked, "site": secrets}


def _save(state, settings, server_round, site, *, masked: bool) -> None:
    state.save({"secagg": _state_payload(settings, server_round, site, masked=masked)})


def _load(state, settings: RunSettings, server_round: int, stage: str) -> tuple[SecAggSite, bool]:
    saved = state.load("secagg", default=None)
    if not saved or saved.get("run") != settings.run_name or saved.get("round") != server_round:
        raise ValueError(f"Secure-aggregation stage {stage!r} of round {server_round} arrived, but this site holds no "
                         "setup for that round (it restarted, or the coordinator skipped a stage).")  # fmt: skip
    secrets = {k: base64.b64decode(v) for k, v in saved["site"].items()}
    return SecAggSite.from_state_dict(secrets), bool(saved.get("masked"))


def shares_to_config(shares: dict[str, list]) -> dict[str, list]:
    """An unmask reply as ConfigRecord values: node ids as strings (they are uint64, beyond sint64)."""
    return {k: [str(v) for v in values] if k.endswith("-owners") else list(values) for k, values in shares.items()}
