"""Non-private training and evaluation of the two-tower model over user histories.

Training is denoising next-items: each step shows a user a random subset of
their own history (recency-weighted pooling) and asks the model to put the
user's whole history on top of the catalogue. One sample = one user, which is
also the unit of user-level DP later.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from fedtower.data.prepared import SampledCandidates, UserHistories
from fedtower.metrics import SAMPLED_K, RankingSums, SampledSums, evaluate_scores
from fedtower.models.losses import LOSSES, candidate_loss, sample_negatives
from fedtower.models.two_tower import (
    TwoTower,
    drop_history,
    pad_histories,
    softmax_cross_entropy,
)


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 6e-3
    schedule: str = "onecycle"  # "onecycle" | "constant"
    history_len: int = 200  # most recent items pooled into the user vector
    history_dropout: float = 0.5  # share of input history hidden each step
    loss: str = "softmax"  # "softmax" (whole catalogue) | "sampled-softmax" | "bpr"
    num_negatives: int = 256  # for the sampled losses
    user_l2: float = 1.0  # L2 on the free user embedding: keeps it a small correction
    weight_decay: float = 0.0
    optimizer: str = "adam"  # "adam" | "sgd" (plain SGD: a one-user client's update is its gradient)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}.")
        if self.schedule not in ("onecycle", "constant"):
            raise ValueError(f"schedule must be 'onecycle' or 'constant', got {self.schedule!r}.")
        if not 0 <= self.history_dropout < 1:
            raise ValueError(f"history_dropout must be in [0, 1), got {self.history_dropout}.")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, got {self.num_negatives}.")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}.")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


def make_optimizer(model: TwoTower, config: TrainConfig, *, users: bool = True) -> torch.optim.Optimizer:
    """The local optimizer; `users=False` leaves the user tower out (federated reconstruction fits it first)."""
    user_params = [p for n, p in model.named_parameters() if n.startswith("user_tower.")] if users else []
    other_params = [p for n, p in model.named_parameters() if not n.startswith("user_tower.")]
    groups = [{"params": other_params, "weight_decay": config.weight_decay}]
    if user_params:
        groups.append({"params": user_params, "weight_decay": config.user_l2})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr)
    return torch.optim.Adam(groups, lr=config.lr)


def private_optimizer_state(optimizer: torch.optim.Optimizer, *, item_tower: bool = True) -> dict:
    """The optimizer state a client keeps between rounds, on the CPU.

    The user-tower moments are always kept. The item-tower moments (two
    catalogue-sized tables) are kept only with `item_tower=True`: they help
    partner sites converge, but cost too much disk on many small clients.
    """
    full = optimizer.state_dict()
    user_slots = set(full["param_groups"][1]["params"]) if len(full["param_groups"]) > 1 else set()
    state = {
        index: {name: (v.detach().cpu() if torch.is_tensor(v) else v) for name, v in slot.items()}
        for index, slot in full["state"].items()
        if item_tower or index in user_slots
    }
    return {"state": state, "param_groups": full["param_groups"]}


def batch_targets(histories: UserHistories, users: np.ndarray, num_items: int) -> torch.Tensor:
    """Dense target weights B x N: each user's own interactions, by behaviour weight."""
    targets = torch.zeros(len(users), num_items)
    for row, u in enumerate(users):
        targets[row, histories.items_of(u)] = torch.from_numpy(histories.weights_of(u))
    return targets


def train_step_loss(
    model: TwoTower,
    histories: UserHistories,
    users: np.ndarray,
    config: TrainConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Mean per-user loss for one batch of user rows."""
    device = model.item_tower.id_embedding.weight.device
    lists = [histories.items_of(u) for u in users]
    history = drop_history(pad_histories(lists, config.history_len), config.history_dropout, generator)
    history = history.to(device)
    user_ids = None
    if model.user_tower.embedding is not None:
        user_ids = torch.as_tensor(users, dtype=torch.long, device=device)
    num_items = model.config.num_items
    if config.loss == "softmax":
        vectors, bias = model.item_table()
        logits = model.user_vectors(user_ids, history, vectors) @ vectors.T + bias
        targets = batch_targets(histories, users, num_items).to(device)
        return softmax_cross_entropy(logits, targets).mean()
    # Sampled losses: one weighted positive per user per step, uniform negatives.
    positives = torch.tensor([_pick_positive(histories, u, generator) for u in users])
    negatives = sample_negatives(
        len(users), config.num_negatives, num_items, positives=positives, generator=generator
    )
    candidates = torch.cat([positives.view(-1, 1), negatives], dim=1).to(device)
    scores = model(
        user_ids if user_ids is not None else torch.zeros(len(users), dtype=torch.long, device=device),
        history,
        candidates,
    )
    return candidate_loss(config.loss, scores).mean()


def _pick_positive(histories: UserHistories, u: int, generator: torch.Generator) -> int:
    items, weights = histories.items_of(u), histories.weights_of(u)
    choice = torch.multinomial(torch.from_numpy(weights.astype(np.float32)), 1, generator=generator)
    return int(items[int(choice)])


def train(
    model: TwoTower,
    histories: UserHistories,
    config: TrainConfig,
    *,
    progress: Callable[[dict], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[dict]:
    """Train in place on every user with history; returns per-epoch logs.

    Pass `optimizer` to continue from earlier state (a federated client keeps
    its own across rounds); otherwise a fresh one is made from `config`.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    trainable = np.flatnonzero(histories.lengths() > 0)
    if len(trainable) == 0:
        raise ValueError("No user has any training interaction; nothing to train on.")
    optimizer = optimizer or make_optimizer(model, config)
    steps_per_epoch = -(-len(trainable) // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    scheduler = None
    # One-cycle needs a few warm-up steps; very short runs keep the constant rate.
    if config.schedule == "onecycle" and total_steps >= 20:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=0.1
        )
    logs = []
    model.train()
    for epoch in range(1, config.epochs + 1):
        started, total = time.perf_counter(), 0.0
        order = rng.permutation(trainable)
        for start in range(0, len(order), config.batch_size):
            loss = train_step_loss(
                model, histories, order[start : start + config.batch_size], config, generator
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += loss.item() * min(config.batch_size, len(order) - start)
        log = {"epoch": epoch, "loss": total / len(order), "seconds": time.perf_counter() - started}
        logs.append(log)
        if progress is not None:
            progress(log)
    model.eval()
    return logs


@torch.no_grad()
def evaluate(
    model: TwoTower,
    train: UserHistories,
    test: UserHistories,
    *,
    k: int = 20,
    history_len: int = 200,
    popularity: np.ndarray | None = None,
    chunk: int = 256,
    pool_history: bool = True,
) -> RankingSums:
    """Full-catalogue ranking metrics as mergeable sums (BENCHMARKS.md protocol).

    Each user's train items are excluded and their test items are relevant.
    `pool_history=False` scores with the free user embedding alone (how an
    interaction-level DP model was trained).
    """
    model.eval()
    device = model.item_tower.id_embedding.weight.device
    vectors, bias = model.item_table()
    item_vectors = vectors.cpu().numpy()
    sums = RankingSums()
    num_users = int((train.lengths() > 0).sum())
    for start in range(0, len(train), chunk):
        rows = np.arange(start, min(start + chunk, len(train)))
        lists = [train.items_of(u) for u in rows]
        history = pad_histories(lists if pool_history else [[]] * len(lists), history_len).to(device)
        user_ids = torch.as_tensor(rows, device=device) if model.user_tower.embedding is not None else None
        scores = (model.user_vectors(user_ids, history, vectors) @ vectors.T + bias).cpu().numpy()
        sums = sums + evaluate_scores(
            scores,
            exclude=lists,
            relevant=[test.items_of(u) for u in rows],
            k=k,
            popularity=popularity,
            num_popularity_users=num_users if popularity is not None else None,
            item_vectors=item_vectors,
        )
    return sums


@torch.no_grad()
def evaluate_sampled(
    model: TwoTower,
    train: UserHistories,
    sampled: SampledCandidates,
    *,
    k: int = SAMPLED_K,
    history_len: int = 200,
    pool_history: bool = True,
    chunk: int = 1024,
) -> SampledSums:
    """HR@k / NDCG@k of held-out items each ranked against its own negatives (the NCF protocol's figure).

    Row r scores user `sampled.user_rows[r]`'s vector (from its train history) against
    `sampled.positives[r]` and `sampled.negatives[r]`; ties rank the positive last.
    """
    model.eval()
    device = model.item_tower.id_embedding.weight.device
    vectors, bias = model.item_table()
    sums = SampledSums(k=k, negatives=int(sampled.negatives.shape[1]))
    for start in range(0, len(sampled), chunk):
        part = slice(start, min(start + chunk, len(sampled)))
        rows = sampled.user_rows[part]
        lists = [train.items_of(u) for u in rows]
        history = pad_histories(lists if pool_history else [[]] * len(lists), history_len).to(device)
        user_ids = torch.as_tensor(rows, device=device) if model.user_tower.embedding is not None else None
        users = model.user_vectors(user_ids, history, vectors)
        candidates = torch.as_tensor(np.concatenate([sampled.positives[part, None], sampled.negatives[part]], axis=1),
                                     device=device)  # fmt: skip
        scores = ((vectors[candidates] @ users.unsqueeze(-1)).squeeze(-1) + bias[candidates]).cpu().numpy()
        sums = sums + SampledSums.of(scores[:, 0], scores[:, 1:], k=k)
    return sums
