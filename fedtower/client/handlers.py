"""The client's work for each Flower message, as plain functions.

`client_app.py` only routes messages here. What is sent back is exactly the
item tower (ITEM_TOWER keys) and a few aggregate metrics; user embeddings,
user ids and per-user counts stay in the node's state dir.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtower.client.local import (
    build_model,
    load_node_data,
    load_user_embeddings,
    pick_device,
    serving_meta,
    state_dir_of,
    user_embeddings_payload,
)
from fedtower.client.private_round import load_accountant, plan_round, train_private_round
from fedtower.client.state import ClientStateStore, StateError
from fedtower.config import RunSettings
from fedtower.metrics import RankingSums
from fedtower.models.training import TrainConfig, evaluate, make_optimizer, private_optimizer_state, train
from fedtower.models.two_tower import TwoTower
from fedtower.privacy.ledger import LedgerEntry, library_versions, pseudonymous_node_id
from fedtower.strategies.item_tower import arrays_digest

log = logging.getLogger("fedtower.client")

RECEIVED_KEPT = 10  # rounds of received-tower digests kept in meta


def settings_of(message: Message, context: Context, run_config: Mapping | None = None) -> RunSettings:
    """Run settings (`run_config` overrides the context's, for in-process simulation).

    The server names the run when the run config leaves it blank.
    """
    settings = RunSettings.from_run_config({**dict(context.run_config), **dict(run_config or {})})
    config = message.content.get("config")
    if not settings.run_name and config is not None and config.get("run-name"):
        settings = replace(settings, run_name=str(config["run-name"]))
    return settings


def open_state(settings: RunSettings, context: Context) -> ClientStateStore:
    state_dir, may_create = state_dir_of(settings, context.node_config)
    if not may_create and not state_dir.is_dir():
        # Never created here: a lost state dir must not silently restart a client from zero.
        raise StateError(
            f"The node's state-dir {state_dir} does not exist. Create it once when setting up the "
            "site (mkdir -m 700); if it existed before, restore it from backup instead."
        )
    return ClientStateStore.for_node(state_dir, context.node_config, create=may_create)


def load_global_item_tower(model: TwoTower, arrays: ArrayRecord) -> None:
    """Load the server's item tower; any other key or shape is refused."""
    model.load_item_tower(arrays.to_torch_state_dict(), source="The server's item tower",
                          hint="do server and client run the same fedtower, catalogue and settings?")  # fmt: skip


class BudgetRefusal(RuntimeError):
    """The site capped its epsilon, and the run would train without DP (unbounded epsilon)."""


def refuse_unbounded_training(settings: RunSettings, node_config: Mapping) -> None:
    """A site that set its own `max-epsilon` never trains without DP: that would spend an
    unbounded epsilon, whatever the coordinator's run config says."""
    if "max-epsilon" in node_config and not settings.dp_enabled:
        raise BudgetRefusal(
            f"This site set max-epsilon = {node_config['max-epsilon']} in its node config, but the run "
            "trains without differential privacy (no noise-multiplier or target-epsilon in its run "
            "config), which has no epsilon bound: refusing to train. Ask the coordinator for a DP run, or "
            "remove max-epsilon from this SuperNode's node config to allow non-private training."
        )


def local_train_config(settings: RunSettings, server_round: int) -> TrainConfig:
    return TrainConfig(
        epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        schedule="constant",
        history_len=settings.history_len,
        history_dropout=settings.history_dropout,
        loss=settings.loss,
        num_negatives=settings.num_negatives,
        user_l2=settings.user_l2,
        seed=settings.seed * 100_003 + server_round,
    )


def train_on_node(message: Message, context: Context, run_config: Mapping | None = None) -> Message:
    started = time.perf_counter()
    settings = settings_of(message, context, run_config)
    refuse_unbounded_training(settings, context.node_config)
    config: ConfigRecord = message.content["config"]
    server_round = int(config.get("server-round", 0))
    state = open_state(settings, context)
    data = load_node_data(settings, context.node_config)
    device = pick_device(settings.device)

    model = build_model(settings, data.catalogue, len(data.users))
    load_global_item_tower(model, message.content["arrays"])
    global_snapshot = {k: v.clone() for k, v in model.item_tower_state().items()}
    load_user_embeddings(model, data.users, state.load("users", default=None))
    meta = state.load("meta", default={}) or {}
    meta = {**meta, "serving": serving_meta(settings, context.node_config)}  # lets `fedtower recommend` find the data
    if settings.dp_enabled:
        return _train_private(message, context, settings, state, data, model, global_snapshot, meta,
                              server_round, device)  # fmt: skip

    model.to(device)
    train_config = local_train_config(settings, server_round)
    optimizer = make_optimizer(model, train_config)
    saved_optimizer = state.load("optimizer", default=None)
    if saved_optimizer is not None and _same_param_shapes(saved_optimizer, optimizer):
        optimizer.load_state_dict(saved_optimizer)
    logs = train(model, data.split.train, train_config, optimizer=optimizer)
    model.cpu()
    state.save(
        {
            "users": user_embeddings_payload(model, data.users),
            "optimizer": private_optimizer_state(optimizer, item_tower=settings.keep_item_moments),
            "item_tower": global_snapshot,  # the latest global tower, for serving
            "meta": _next_meta(meta, message, server_round, data.source),
        }
    )
    content = train_content(ArrayRecord(model.item_tower_state()), num_examples=len(data.users),
                            train_loss=float(logs[-1]["loss"]), seconds=time.perf_counter() - started)  # fmt: skip
    return Message(content=content, reply_to=message)


# What each reply carries is built here and only here: `fedtower site check` shows a site
# exactly these records (fedtower/deployment/site_check.py), so the two cannot drift apart.


def train_content(arrays: ArrayRecord, *, num_examples: int, train_loss: float, seconds: float) -> RecordDict:
    """A round without DP: the trained item tower and three aggregate metrics."""
    metrics = MetricRecord({"num-examples": num_examples, "train-loss": train_loss, "train-seconds": seconds})
    return RecordDict({"arrays": arrays, "metrics": metrics})


def private_train_content(arrays: ArrayRecord, entry: LedgerEntry, *, exhausted: bool) -> RecordDict:
    """A DP round: the item tower, a constant weight, the budget status and the ledger entry."""
    # Constant weight: an example count would leak the site's size to the aggregate.
    metrics = MetricRecord({"num-examples": 1, "budget-exhausted": int(exhausted)})
    return RecordDict({"arrays": arrays, "metrics": metrics, "ledger": entry.to_config_record()})


def evaluate_content(sums: RankingSums) -> RecordDict:
    """An evaluation: ranking sums over the local users (mergeable), nothing per user."""
    payload = sums.to_dict()
    payload["num-examples"] = max(sums.users, 1)
    return RecordDict({"metrics": MetricRecord(payload)})


def _next_meta(meta: dict, message: Message, server_round: int, source: str, trained: bool = True) -> dict:
    received = dict(list(dict(meta.get("received", {})).items())[-(RECEIVED_KEPT - 1) :])
    # Which global tower each recent round started from (public; lets a resume be checked).
    received[str(server_round)] = arrays_digest(message.content["arrays"])
    rounds_trained = int(meta.get("rounds_trained", 0)) + (1 if trained else 0)
    return {**meta, "rounds_trained": rounds_trained, "last_round": server_round,
            "data_source": source, "received": received}  # fmt: skip


def _train_private(message, context, settings, state, data, model, global_snapshot, meta, server_round,
                   device) -> Message:  # fmt: skip
    """A DP round: budget check first; replies carry a constant weight and the ledger entry only."""
    accountant = load_accountant(state)
    plan, calibration = plan_round(settings, context.node_config, data.split.train, accountant,
                                   state.load("calibration", default=None))  # fmt: skip
    node = pseudonymous_node_id(context.node_id, settings.run_name)
    if plan.exhausted:
        log.warning("Node %s: this round would reach epsilon %.3f > cap %.3f; not training (budget "
                    "exhausted).", node, plan.epsilon_after, plan.cap)  # fmt: skip
        entry = ledger_entry(settings, plan, node, server_round, accountant, status="budget-exhausted")
        state.append_ledger(entry.to_dict())
        state.save({"item_tower": global_snapshot,
                    "meta": _next_meta(meta, message, server_round, data.source, trained=False)})  # fmt: skip
        return _private_reply(message, message.content["arrays"], entry, exhausted=True)

    model.to(device)
    item_state = state.load("dp_optimizer", default=None)
    dp_state = train_private_round(model, data.split.train, settings, plan, accountant,
                                   seed=settings.seed * 100_003 + server_round,
                                   item_optimizer_state=item_state)  # fmt: skip
    model.cpu()
    entry = ledger_entry(settings, plan, node, server_round, accountant, status="trained")
    # One atomic save: the accountant can never lag behind what was trained and released.
    state.save(
        {
            "users": user_embeddings_payload(model, data.users),
            "dp_optimizer": dp_state if settings.keep_item_moments else {},
            "accountant": accountant.state_dict(),
            "calibration": calibration,
            "item_tower": global_snapshot,
            "meta": _next_meta(meta, message, server_round, data.source),
        }
    )
    state.append_ledger(entry.to_dict())
    return _private_reply(message, ArrayRecord(model.item_tower_state()), entry, exhausted=False)


def ledger_entry(settings, plan, node: str, server_round: int, accountant, *, status: str) -> LedgerEntry:
    return LedgerEntry(
        run=settings.run_name,
        round=server_round,
        node=node,
        unit=plan.unit,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps if status == "trained" else 0,
        max_grad_norm=settings.max_grad_norm,
        delta=plan.delta,
        accountant="rdp",
        epsilon_before=plan.epsilon_before,
        epsilon_after=accountant.epsilon(delta=plan.delta) if accountant.history else 0.0,
        status=status,
        weights="constant",
        history=[list(h) for h in accountant.history],
        versions=library_versions(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _private_reply(message: Message, arrays: ArrayRecord, entry: LedgerEntry, *, exhausted: bool) -> Message:
    return Message(content=private_train_content(arrays, entry, exhausted=exhausted), reply_to=message)


def evaluate_on_node(message: Message, context: Context, run_config: Mapping | None = None) -> Message:
    """Rank the whole catalogue for each local user with their private embedding; send sums only."""
    settings = settings_of(message, context, run_config)
    state = open_state(settings, context)
    data = load_node_data(settings, context.node_config)
    model = build_model(settings, data.catalogue, len(data.users))
    load_global_item_tower(model, message.content["arrays"])
    load_user_embeddings(model, data.users, state.load("users", default=None))
    interaction_dp = settings.dp_enabled and settings.privacy_unit == "interaction"
    model.to(pick_device(settings.device))  # evaluate() puts each batch on the model's device
    sums = evaluate(model, data.split.train, data.split.test, k=settings.k, history_len=settings.history_len,
                    pool_history=not interaction_dp)  # fmt: skip
    if state.has("item_tower"):  # serve from the newest global tower: the final one only arrives here
        state.save({"item_tower": {k: v.detach().cpu().clone() for k, v in model.item_tower_state().items()}})
    return Message(content=evaluate_content(sums), reply_to=message)


def _same_param_shapes(saved: dict, optimizer: torch.optim.Optimizer) -> bool:
    """A saved optimizer fits only if every parameter it tracked has the same shape now."""
    current = optimizer.state_dict()
    if len(saved.get("param_groups", [])) != len(current["param_groups"]):
        return False
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, slot in saved.get("state", {}).items():
        avg = slot.get("exp_avg")
        if index >= len(params) or avg is None or tuple(avg.shape) != tuple(params[index].shape):
            return False
    return True
