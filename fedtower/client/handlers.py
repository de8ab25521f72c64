"""The client's work for each Flower message, as plain functions.

`client_app.py` only routes messages here. What is sent back is exactly the
item tower (ITEM_TOWER keys) and a few aggregate numbers; user embeddings,
user ids and per-user counts stay in the node's state dir. In a DP run every
number sent is DP and charged to the node's accountant, or not sent (see
`private_train_content`, `dp_evaluate_content`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtower.client.ledger_signing import LedgerSigner
from fedtower.client.local import (
    NodeData,
    build_model,
    load_node_data,
    load_user_embeddings,
    pick_device,
    serving_meta,
    state_dir_of,
    user_embeddings_payload,
)
from fedtower.client.node_settings import NodeSettings
from fedtower.client.private_round import (
    EPSILON_SLACK,
    PrivacyRefusal,
    ReleasePlan,
    budget_cap,
    calibrate,
    load_accountant,
    plan_evaluation,
    plan_training,
    train_private_round,
)
from fedtower.client.rollback import SEQUENCE_KEY, RollbackCounter
from fedtower.client.secure_round import secure_train
from fedtower.client.spectral_round import spectral_train
from fedtower.client.state import ClientStateStore, StateError
from fedtower.client.threads import use_client_threads
from fedtower.compression import encode_tower
from fedtower.config import RunSettings
from fedtower.metrics import RankingSums, SampledSums
from fedtower.models.training import (
    TrainConfig,
    evaluate,
    evaluate_sampled,
    make_optimizer,
    private_optimizer_state,
    train,
)
from fedtower.models.two_tower import TwoTower
from fedtower.privacy.accounting import compose
from fedtower.privacy.dp_evaluation import SENSITIVITY, NoisyEvaluation
from fedtower.privacy.ledger import (
    LedgerEntry,
    library_versions,
    pseudonymous_node_id,
    sign_entry,
    signed_to_config_record,
)
from fedtower.privacy.secure_random import DPRandom
from fedtower.strategies.item_tower import arrays_digest

log = logging.getLogger("fedtower.client")

RECEIVED_KEPT = 10  # rounds of received-tower digests kept in meta
DP_USERS = "dp_users"  # interaction unit: the user table as DP-SGD left it, never touched by serving


def settings_of(message: Message, context: Context, run_config: Mapping | None = None) -> RunSettings:
    """Run settings (`run_config` overrides the context's, for in-process simulation).

    The server names the run when the run config leaves it blank.
    """
    settings = RunSettings.from_run_config({**dict(context.run_config), **dict(run_config or {})})
    config = message.content.get("config")
    if not settings.run_name and config is not None and config.get("run-name"):
        settings = replace(settings, run_name=str(config["run-name"]))
    return settings


def open_state(settings: RunSettings, node: NodeSettings) -> ClientStateStore:
    state_dir, may_create = state_dir_of(settings, node)
    if not may_create and not state_dir.is_dir():
        # Never created here: a lost state dir must not silently restart a client from zero.
        raise StateError(
            f"The node's state-dir {state_dir} does not exist. Create it once when setting up the "
            "site (mkdir -m 700); if it existed before, restore it from backup instead."
        )
    # A simulation's own stores (created here, recreated by a rerun) skip fsync; a site's never do.
    store = ClientStateStore.for_node(state_dir, node, create=may_create, durable=not may_create)
    if node.deployed and store.key_id is None and not node.allow_plaintext_state:
        # Unkeyed checksums can be recomputed by anyone who can write the directory (a forged, empty
        # accountant would pass), so a deployed node keeps its state authenticated unless the site opts out.
        raise StateError(
            f"This node keeps its private state in {state_dir} without a state key, so anyone who can write "
            "there can rewrite its privacy accountant undetected. Give it a key (node config state-key-file; "
            "`fedtower state keygen KEYFILE`, then `fedtower state encrypt` for an existing state), or accept "
            "plaintext state explicitly with allow-plaintext-state = true in the node config."
        )
    return store


def load_global_item_tower(model: TwoTower, arrays: ArrayRecord) -> None:
    """Load the server's item tower; any other key or shape is refused."""
    model.load_item_tower(arrays.to_torch_state_dict(), source="The server's item tower",
                          hint="do server and client run the same fedtower, catalogue and settings?")  # fmt: skip


class BudgetRefusal(RuntimeError):
    """The site capped its epsilon, and the run would train without DP (unbounded epsilon)."""


def refuse_unbounded_training(settings: RunSettings, node: NodeSettings) -> None:
    """A site that set its own `max-epsilon` never trains without DP: that would spend an
    unbounded epsilon, whatever the coordinator's run config says."""
    if node.max_epsilon is not None and not settings.dp_enabled:
        raise BudgetRefusal(
            f"This site set max-epsilon = {node.max_epsilon} in its node config, but the run "
            "trains without differential privacy (no noise-multiplier or target-epsilon in its run "
            "config), which has no epsilon bound: refusing to train. Ask the coordinator for a DP run, or "
            "remove max-epsilon from this SuperNode's node config to allow non-private training."
        )


def dp_randomness(node: NodeSettings, server_round: int) -> DPRandom:
    """The round's DP randomness: keyed from the OS, unless the site set the test-only seed."""
    if node.test_only_insecure_dp_seed is None:
        return DPRandom()
    log.warning("Node config test-only-insecure-dp-seed is set: this round's DP noise is reproducible by "
                "anyone who knows the seed, so it is NOT private. Never set it outside tests.")  # fmt: skip
    return DPRandom.test_only_seeded(node.test_only_insecure_dp_seed * 1_000_003 + server_round)


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
        optimizer=settings.local_optimizer,
        seed=settings.seed * 100_003 + server_round,  # no DP here: reproducible on purpose
    )


def _node(context: Context) -> NodeSettings:
    return NodeSettings.from_node_config(context.node_config)


def train_on_node(message: Message, context: Context, run_config: Mapping | None = None) -> Message:
    started = time.perf_counter()
    settings = settings_of(message, context, run_config)
    node = _node(context)
    refuse_unbounded_training(settings, node)
    use_client_threads(settings, node)
    if settings.secure_aggregation:
        return secure_train(message, context, settings, node, open_state(settings, node))
    if node.require_secure_aggregation:
        raise PrivacyRefusal(
            "This site requires secure aggregation (node config require-secure-aggregation = true), but the run "
            "sends each site's update in the clear: refusing to train. Ask the coordinator for a run with "
            "secure-aggregation = true."
        )
    if settings.spectral:
        return spectral_train(message, context, settings, node, open_state(settings, node))
    config: ConfigRecord = message.content["config"]
    server_round = int(config.get("server-round", 0))
    state = open_state(settings, node)
    with state.round_lock(node.train_lock_timeout):
        data, model, global_snapshot, meta = open_round(message, settings, node, state)
        if settings.dp_enabled:
            return _train_private(message, context, settings, node, state, data, model, global_snapshot, meta,
                                  server_round)  # fmt: skip
        saved = state.load_many(["users", "optimizer"], default=None)  # one generation, one read of the manifest
        load_user_embeddings(model, data.users, saved["users"])
        model.to(pick_device(settings.device))
        train_config = local_train_config(settings, server_round)
        reconstruct_users(model, data.split.train, train_config, settings.reconstruction_epochs,
                          settings.reconstruction_lr)
        optimizer = local_optimizer(model, train_config, settings)
        saved_optimizer = saved["optimizer"]
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
    arrays = tower_reply_arrays(settings, model, message.content["arrays"])
    if settings.client_dp != "off":
        # Client-level DP: the update is clipped and noised across clients; a loss or a time of this one
        # person's training would leave outside that guarantee.
        return Message(content=client_dp_train_content(arrays), reply_to=message)
    content = train_content(arrays, num_examples=len(data.users), train_loss=float(logs[-1]["loss"]),
                            seconds=time.perf_counter() - started)  # fmt: skip
    return Message(content=content, reply_to=message)


def reconstruct_users(model: TwoTower, histories, config: TrainConfig, epochs: int, lr: float = 0.0) -> None:
    """Federated reconstruction: fit the users' private vectors to the received item tower, which stays
    frozen (only the user tower is in the optimizer), before the round's own training."""
    if epochs <= 0 or model.user_tower.embedding is None:
        return
    user_params = [p for n, p in model.named_parameters() if n.startswith("user_tower.")]
    frozen = [p for n, p in model.named_parameters() if not n.startswith("user_tower.") and p.requires_grad]
    lr = lr or config.lr
    optimizer = torch.optim.Adam([{"params": user_params, "weight_decay": config.user_l2}], lr=lr)
    for parameter in frozen:  # no backward through the item tower: it is not being fitted (half the cost)
        parameter.requires_grad_(False)
    try:
        train(model, histories, replace(config, epochs=epochs, optimizer="adam", lr=lr), optimizer=optimizer)
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
    model.zero_grad(set_to_none=True)


def local_optimizer(model: TwoTower, config: TrainConfig, settings: RunSettings) -> torch.optim.Optimizer:
    """The round's optimizer. With reconstruction the user tower was fitted just before and stays fixed: the
    round's training updates the item tower only (Singhal et al. 2021, Algorithm 1). That also keeps an SGD
    learning rate sized for item-tower gradients (and its weight decay) off the user vectors."""
    return make_optimizer(model, config, users=settings.reconstruction_epochs == 0)


# What each reply carries is built here and only here: `fedtower site check` shows a site
# exactly these records (fedtower/deployment/site_check.py), so the two cannot drift apart.


def open_round(message: Message, settings: RunSettings, node: NodeSettings, state: ClientStateStore):
    """A round's start, inside the node's round lock: (data, model holding the received item tower, a copy of
    that tower (what the node serves until the next round), the node's meta with its serving settings)."""
    data = load_node_data(settings, node)
    model = build_model(settings, data.catalogue, len(data.users))
    load_global_item_tower(model, message.content["arrays"])
    global_snapshot = {k: v.clone() for k, v in model.item_tower_state().items()}
    meta = state.load("meta", default={}) or {}
    meta = {**meta, "serving": serving_meta(settings, node)}  # lets `fedtower recommend` find the data
    return data, model, global_snapshot, meta


def commit_refusal(round_: _PrivateRound, plan, message: Message, server_round: int, data, global_snapshot: dict,
                   *, what: str, added: list | None = None, **entry_fields) -> dict:  # fmt: skip
    """A release the budget cannot pay for: log it, record it in the ledger (nothing trained; a refusal that
    names the sampling rate releases the pending count unless `added` says otherwise) and keep serving the
    received tower. Returns the signed ledger record."""
    log.warning("Node %s: %s would reach epsilon %.3f > cap %.3f; not releasing it (budget exhausted).",
                round_.node_name, what, plan.epsilon_after, plan.cap)  # fmt: skip
    added = round_.pending_count() if added is None else added
    entry = round_.entry(plan, status="budget-exhausted", added=added, **entry_fields)
    meta = _next_meta(round_.meta, message, server_round, data.source, trained=False)
    return round_.commit({"item_tower": global_snapshot, "meta": meta}, added, entry)


def tower_reply_arrays(settings: RunSettings, model: TwoTower, received: ArrayRecord) -> ArrayRecord:
    """The trained item tower as the run sends it: fp32 as is, or its delta from `received` compressed."""
    trained = model.item_tower_state()
    if settings.update_compression == "fp32":
        return ArrayRecord(trained)
    encoded = encode_tower({k: v.detach().cpu().numpy() for k, v in trained.items()},
                           {k: received[k].numpy() for k in trained}, codec=settings.update_compression)  # fmt: skip
    return ArrayRecord({key: Array(value) for key, value in encoded.items()})


def train_content(arrays: ArrayRecord, *, num_examples: int, train_loss: float, seconds: float) -> RecordDict:
    """A round without DP: the trained item tower and three aggregate metrics."""
    metrics = MetricRecord({"num-examples": num_examples, "train-loss": train_loss, "train-seconds": seconds})
    return RecordDict({"arrays": arrays, "metrics": metrics})


def client_dp_train_content(arrays: ArrayRecord) -> RecordDict:
    """A round under client-level DP: the item tower and the equal weight Flower's wrapper checks."""
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})})


def private_train_content(arrays: ArrayRecord, record: dict, *, exhausted: bool) -> RecordDict:
    """A DP round: the item tower, a constant weight, the budget status and the signed ledger entry."""
    # Constant weight: an example count would leak the site's size to the aggregate.
    metrics = MetricRecord({"num-examples": 1, "budget-exhausted": int(exhausted)})
    return RecordDict({"arrays": arrays, "metrics": metrics, "ledger": signed_to_config_record(record)})


def evaluate_content(sums: RankingSums, sampled: SampledSums | None = None) -> RecordDict:
    """An evaluation without DP: ranking sums over the local users (mergeable), nothing per user; and the
    sampled-negative sums when the split has negatives."""
    payload = sums.to_dict()
    payload["num-examples"] = max(sums.users, 1)
    if sampled is not None:
        payload |= sampled.to_metrics()
    return RecordDict({"metrics": MetricRecord(payload)})


def dp_evaluate_content(release: NoisyEvaluation, record: dict) -> RecordDict:
    """A DP evaluation: six noisy sums, their noise level, and the signed ledger entry that charged them."""
    payload = {**release.to_metrics(), "num-examples": 1}
    return RecordDict({"metrics": MetricRecord(payload), "ledger": signed_to_config_record(record)})


def raw_evaluate_content(sums: RankingSums, record: dict | None, sampled: SampledSums | None = None) -> RecordDict:
    """Exact sums in a DP run, because the site opted in (node config allow-raw-evaluation)."""
    content = evaluate_content(sums, sampled)
    content["metrics"]["raw-evaluation"] = 1
    if record is not None:
        content["ledger"] = signed_to_config_record(record)
    return content


def withheld_evaluate_content(reason: str, *, refused: bool = False) -> RecordDict:
    """Nothing measured is sent: the budget would be exceeded, no DP evaluation fits the run, or (`refused`)
    the node evaluates nothing: it refuses evaluation, or its split holds nothing out."""
    log.info("Evaluation withheld: %s", reason)
    metrics = {"num-examples": 1, "evaluation-withheld": 1}
    if refused:
        metrics["evaluation-refused"] = 1
    return RecordDict({"metrics": MetricRecord(metrics)})


def _next_meta(meta: dict, message: Message, server_round: int, source: str, trained: bool = True) -> dict:
    received = dict(list(dict(meta.get("received", {})).items())[-(RECEIVED_KEPT - 1) :])
    # Which global tower each recent round started from (public; lets a resume be checked).
    received[str(server_round)] = arrays_digest(message.content["arrays"])
    rounds_trained = int(meta.get("rounds_trained", 0)) + (1 if trained else 0)
    return {**meta, "rounds_trained": rounds_trained, "last_round": server_round,
            "data_source": source, "received": received}  # fmt: skip


# ---------------------------------------------------------------- DP rounds


class _PrivateRound:
    """What every DP release on a node shares: the checked state, the accountant, the calibration.

    Built inside the node's round lock, so that the budget check, the release and the
    accountant's save are one read-modify-write (a second round waits for this one).
    """

    def __init__(self, settings: RunSettings, node: NodeSettings, state: ClientStateStore, data: NodeData,
                 context: Context, server_round: int, meta: dict | None = None, *,
                 vector_length: int = 0):  # fmt: skip
        self.settings, self.node, self.state, self.data = settings, node, state, data
        self.server_round = server_round
        self.counter = RollbackCounter(node.counter_path, state.state_dir)
        self.counter.check(state)
        self.accountant = load_accountant(state)
        self.randomness = dp_randomness(node, server_round)
        saved_calibration = state.load("calibration", default=None)
        self.calibration, self.count = calibrate(settings, node, data.split.train, self.accountant,
                                                 saved_calibration, self.randomness,
                                                 vector_length=vector_length)  # fmt: skip
        self.previous_delta = (saved_calibration or {}).get("delta")
        self.meta = dict(meta if meta is not None else state.load("meta", default={}) or {})
        self.node_name = _pseudonym(self.meta, context.node_id, settings.run_name)
        self.cap = budget_cap(settings, node)
        self.signer = LedgerSigner.for_node(node, state)
        # The run's DP count is due but does not fit in the budget: nothing may reveal it (or what
        # depends on it: the sampling rate, the default delta), and nothing is charged.
        self.blind = bool(self.count) and self.accountant.epsilon_with(
            self.count, delta=self.calibration.delta) > self.cap * (1 + EPSILON_SLACK)

    def entry(self, plan: ReleasePlan, *, status: str, added: list, mechanism: str = "none",
              max_grad_norm: float | None = None, trust: str = "", release: str = "") -> LedgerEntry:  # fmt: skip
        calibration, accountant = self.calibration, self.accountant
        own = plan.own
        # A tagged entry is ["skellam", z, q, ...]; a Gaussian one (z, q, steps).
        noise, rate = (own[1], own[2]) if isinstance(own[0], str) else (own[0], own[1])
        delta, population, source = calibration.delta, calibration.population, calibration.population_source
        if self.blind:
            # Placeholders that say nothing about this run's count: an earlier run's public delta (or, for a
            # node that never spent anything, any delta: epsilon is 0), no sampling rate, no population.
            rate, population, source = 1.0, 0, "unrecorded"
            delta = self.previous_delta or self.node.max_delta or PLACEHOLDER_DELTA
        return LedgerEntry(
            run=self.settings.run_name,
            round=self.server_round,
            node=self.node_name,
            unit=calibration.unit,
            noise_multiplier=noise,
            sample_rate=rate,
            steps=plan.steps if status == "trained" else 0,
            max_grad_norm=max_grad_norm or self.settings.max_grad_norm,
            delta=delta,
            accountant=self.node.accountant,
            epsilon_before=accountant.epsilon(delta=delta),
            epsilon_after=accountant.epsilon_with(added, delta=delta),
            status=status,
            weights="constant",
            history=[list(h) for h in compose(accountant.history, added)],
            versions=library_versions(),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            added=[list(a) for a in added],
            mechanism=mechanism,
            population=population,
            population_source=source,
            randomness=self.randomness.source,
            raw_evaluation=self.node.allow_raw_evaluation,
            hooks=self.node.hooks,
            **({"trust": trust} if trust else {}),
            **({"release": release} if release else {}),
        )

    def pending_count(self) -> list:
        """The run's DP count when it must be charged with a release that reveals it, else []."""
        return [] if self.blind else list(self.count)

    def commit(self, components: dict, added: list, entry: LedgerEntry) -> dict:
        """Charge `added` and save it with `components` in one atomic write, then advance the
        rollback counter and log the entry, chained and signed: the accountant never lags behind
        what is released. Returns the signed record (what the reply carries)."""
        record = self.signer.sign(entry, self.state.read_ledger())
        components = {**components, **(self.signer.new_component or {})}
        meta = components.pop("meta", self.meta)
        if self.blind:  # nothing charged, no calibration kept: the count was never released
            self.state.save({**components, "meta": meta})
        else:
            self.accountant.charge(added)
            meta = {**meta, SEQUENCE_KEY: int(meta.get(SEQUENCE_KEY, 0)) + 1}
            self.state.save({**components, "accountant": self.accountant.state_dict(),
                             "calibration": self.calibration.to_dict(), "meta": meta})  # fmt: skip
            self.counter.advance(self.state)
        self.state.append_ledger(record)
        self.signer.new_component = None
        return record


PLACEHOLDER_DELTA = 1e-5


def _pseudonym(meta: dict, node_id: int, run: str) -> str:
    """This node's name in the run's ledger: an HMAC of its node id under a secret of its own for the run,
    kept in its state (so it stays the same for the run, and nobody can link it to the node id)."""
    keys = dict(meta.get("pseudonym_keys") or {})
    if run not in keys:
        keys[run] = os.urandom(32).hex()
        meta["pseudonym_keys"] = keys
    return pseudonymous_node_id(node_id, run, bytes.fromhex(keys[run]))


def _train_private(message, context, settings, node, state, data, model, global_snapshot, meta,
                   server_round) -> Message:  # fmt: skip
    """A DP round: budget check first; replies carry a constant weight and the ledger entry only."""
    round_ = _PrivateRound(settings, node, state, data, context, server_round, meta)
    plan = plan_training(round_.calibration, round_.accountant, round_.count, round_.cap)
    if plan.exhausted:
        record = commit_refusal(round_, plan, message, server_round, data, global_snapshot, what="this round")
        return _private_reply(message, message.content["arrays"], record, exhausted=True)

    interaction = settings.privacy_unit == "interaction"
    # The interaction unit trains the user table inside DP: start from the table DP last left, never from
    # rows serving re-fitted outside DP (`users`), which would break the per-event bound.
    load_user_embeddings(model, data.users, state.load(DP_USERS if interaction else "users", default=None))
    model.to(pick_device(settings.device))
    dp_state = train_private_round(model, data.split.train, settings, plan, randomness=round_.randomness,
                                   item_optimizer_state=state.load("dp_optimizer", default=None),
                                   node=node)  # fmt: skip
    model.cpu()
    compressed = settings.update_compression != "fp32"
    entry = round_.entry(plan, status="trained", added=plan.added, mechanism="dp-sgd",
                         release=f"item-tower-delta-{settings.update_compression}" if compressed else "")  # fmt: skip
    users = user_embeddings_payload(model, data.users)
    components = {
        "users": users,
        "dp_optimizer": dp_state if settings.keep_item_moments else {},
        "item_tower": global_snapshot,
        "meta": _next_meta(round_.meta, message, server_round, data.source),
    }
    if interaction:
        components[DP_USERS] = users
    record = round_.commit(components, plan.added, entry)
    # Encoded after the noise: compression is post-processing of the DP release.
    arrays = tower_reply_arrays(settings, model, message.content["arrays"])
    return _private_reply(message, arrays, record, exhausted=False)


def _private_reply(message: Message, arrays: ArrayRecord, record: dict, *, exhausted: bool) -> Message:
    return Message(content=private_train_content(arrays, record, exhausted=exhausted), reply_to=message)


# ---------------------------------------------------------------- evaluation


def evaluate_on_node(message: Message, context: Context, run_config: Mapping | None = None) -> Message:
    """Rank the whole catalogue for each local user with their private embedding; send sums only.

    In a DP run the sums are released with DP noise and charged (or withheld), never exact,
    unless the site opted in to exact sums (node config allow-raw-evaluation).
    """
    settings = settings_of(message, context, run_config)
    node = _node(context)
    use_client_threads(settings, node)
    state = open_state(settings, node)
    dp_run = settings.dp_enabled or settings.client_dp != "off"
    with state.round_lock(node.train_lock_timeout):
        data = load_node_data(settings, node)
        model = build_model(settings, data.catalogue, len(data.users))
        load_global_item_tower(model, message.content["arrays"])
        if state.has("item_tower"):  # serve from the newest global tower: the final one only arrives here
            state.save({"item_tower": {k: v.detach().cpu().clone() for k, v in model.item_tower_state().items()}})
        # Nothing measured leaves a node that refuses evaluation, or whose split holds nothing out (split =
        # none: it trains on everything); nothing is charged either.
        if not node.evaluate:
            return Message(content=withheld_evaluate_content("the node refuses evaluation (node config evaluate = "
                                                             "false)", refused=True), reply_to=message)  # fmt: skip
        if not data.split.evaluable:
            return Message(content=withheld_evaluate_content(f"nothing is held out to evaluate on (split "
                                                             f"{data.split.protocol})", refused=True),
                           reply_to=message)  # fmt: skip
        # Interaction-level DP-SGD scores with the DP user table alone; the spectral tower pools every
        # user's own history (on the client, post-processing of the released tower).
        interaction_dp = settings.dp_enabled and settings.privacy_unit == "interaction" and not settings.spectral
        load_user_embeddings(model, data.users, state.load(DP_USERS if interaction_dp else "users", default=None))
        model.to(pick_device(settings.device))  # evaluate() puts each batch on the model's device
        sums = evaluate(model, data.split.train, data.split.test, k=settings.k, history_len=settings.history_len,
                        pool_history=not interaction_dp)  # fmt: skip
        sampled = None  # HR@10 / NDCG@10 against the split's sampled negatives: exact sums, never DP-released
        if data.split.sampled is not None and len(data.split.sampled):
            sampled = evaluate_sampled(model, data.split.train, data.split.sampled, k=settings.sampled_k,
                                       history_len=settings.history_len, pool_history=not interaction_dp)  # fmt: skip
        if not dp_run:
            return Message(content=evaluate_content(sums, sampled), reply_to=message)
        if not settings.dp_enabled:  # client-level DP: no local accountant to charge a DP evaluation to
            if node.allow_raw_evaluation:
                log.warning("Releasing exact evaluation sums in a client-level DP run (node config "
                            "allow-raw-evaluation = true).")  # fmt: skip
                return Message(content=raw_evaluate_content(sums, None, sampled), reply_to=message)
            return Message(content=withheld_evaluate_content(
                "client-level DP protects the update, not a per-client evaluation; set allow-raw-evaluation in "
                "the node config to release exact sums"), reply_to=message)  # fmt: skip
        server_round = int(message.content["config"].get("server-round", 0))
        length = sum(v.numel() for v in model.item_tower_state().values())
        content = _evaluate_private(settings, node, state, data, context, server_round, sums, length, sampled)
        return Message(content=content, reply_to=message)


def _evaluate_private(settings, node, state, data, context, server_round, sums: RankingSums,
                      vector_length: int = 0, sampled: SampledSums | None = None) -> RecordDict:  # fmt: skip
    round_ = _PrivateRound(settings, node, state, data, context, server_round, vector_length=vector_length)
    plan = plan_evaluation(round_.calibration, round_.accountant, round_.count, round_.cap)
    if node.allow_raw_evaluation:
        log.warning("Node %s releases exact evaluation sums in a DP run (node config allow-raw-evaluation).",
                    round_.node_name)  # fmt: skip
        added = round_.pending_count()
        entry = round_.entry(plan, status="raw-evaluation", added=added, max_grad_norm=SENSITIVITY)
        return raw_evaluate_content(sums, round_.commit({}, added, entry), sampled)
    if plan.exhausted:
        return withheld_evaluate_content(f"a DP evaluation would reach epsilon {plan.epsilon_after:.3f} > cap "
                                         f"{plan.cap:.3f}")  # fmt: skip
    release = NoisyEvaluation.release(sums, noise_multiplier=round_.calibration.eval_noise_multiplier,
                                      randomness=round_.randomness)  # fmt: skip
    entry = round_.entry(plan, status="evaluated", added=plan.added, mechanism="gaussian", max_grad_norm=SENSITIVITY)
    return dp_evaluate_content(release, round_.commit({}, plan.added, entry))


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


def ledger_record_placeholder(settings: RunSettings) -> dict:
    """A signed ledger entry with placeholder numbers, to show a site which fields its replies carry."""
    from fedtower.privacy.ledger import generate_signing_key, public_key_text

    key = generate_signing_key()
    entry = LedgerEntry(run=settings.run_name or "run", round=1, node="node", unit=settings.privacy_unit,
                        noise_multiplier=1.0, sample_rate=1.0, steps=1, max_grad_norm=settings.max_grad_norm,
                        delta=1e-5, accountant="rdp", epsilon_before=0.0, epsilon_after=0.0, status="trained",
                        weights="constant", history=[[1.0, 1.0, 1]], population=1, population_source="declared",
                        randomness=DPRandom().source, sequence=1, signer=public_key_text(key.public_key()))  # fmt: skip
    return sign_entry(entry, key)
