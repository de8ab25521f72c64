"""DP-SGD on a client with Opacus, at the user or the interaction level.

Each step Poisson-samples DP samples with rate q, computes per-sample
gradients (Opacus GradSampleModule), clips each to `max_grad_norm`, adds
Gaussian noise of std `noise_multiplier * max_grad_norm` to the sum (Opacus
DPOptimizer), and takes an optimizer step. An empty Poisson batch still takes
a noise-only step: skipping it would break the sampled-Gaussian analysis.

- unit "user": one sample = one user's whole local history. The per-user
  gradient of the item tower is clipped. The user's own free embedding enters
  the forward as an input and is updated outside the DP step from that user's
  loss only (it influences nothing but that user's own clipped contribution).
- unit "interaction": one sample = one counted event. The user vector is the
  free embedding alone (pooling other events into it would let one event move
  other samples' gradients), and the user table is trained inside the DP step
  with everything else: the released item tower is post-processing of a DP
  trajectory. There is no switch to train user embeddings outside DP here.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedtower.data.prepared import UserHistories
from fedtower.models.losses import sample_negatives
from fedtower.models.two_tower import PAD, TwoTower, drop_history, pad_histories

log = logging.getLogger("fedtower.client")
# Opacus's full backward hooks warn when the inputs are integer ids (which never need gradients).
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")

UNITS = ("user", "interaction")


@dataclass(frozen=True)
class DPConfig:
    unit: str
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    lr: float
    user_l2: float = 1.0
    positives: int = 8  # user unit: positives drawn per user per step
    num_negatives: int = 64
    history_len: int = 200
    history_dropout: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"privacy-unit must be one of {UNITS} for DP training, got {self.unit!r}.")
        if not self.noise_multiplier > 0:
            raise ValueError(f"The noise multiplier must be positive, got {self.noise_multiplier}.")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max-grad-norm must be positive, got {self.max_grad_norm}.")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"The sampling rate must be in (0, 1], got {self.sample_rate}.")
        if self.steps < 1:
            raise ValueError(f"DP training needs at least one step, got {self.steps}.")


@dataclass
class InteractionSamples:
    """Counted events as DP samples: user row, item row, label weight."""

    users: np.ndarray
    items: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def from_histories(cls, histories: UserHistories) -> InteractionSamples:
        lengths = histories.lengths()
        return cls(np.repeat(np.arange(len(histories)), lengths), histories.items.copy(),
                   histories.weights.astype(np.float32))  # fmt: skip


def num_dp_samples(unit: str, histories: UserHistories) -> int:
    """Users with history (user unit) or interactions (interaction unit)."""
    return int((histories.lengths() > 0).sum()) if unit == "user" else int(histories.items.size)


def _poisson(count: int, rate: float, generator: torch.Generator) -> np.ndarray:
    return torch.nonzero(torch.rand(count, generator=generator) < rate).flatten().numpy()


class DPTrainer:
    """Runs `config.steps` DP-SGD steps on `model` for one round."""

    def __init__(self, model: TwoTower, config: DPConfig, *, item_optimizer_state: dict | None = None):
        self.model = model
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)  # Poisson sampling only
        self.step_index = 0
        user_table = model.user_tower.embedding
        if config.unit == "user" and user_table is not None:
            # Outside the DP step: frozen for Opacus, updated from each user's own loss.
            user_table.weight.requires_grad_(False)
            self.user_optimizer = RowAdam(user_table.weight, lr=config.lr, weight_decay=config.user_l2)
        else:
            self.user_optimizer = None
        self.module = GradSampleModule(model)
        dp_params = [p for p in model.parameters() if p.requires_grad]
        inner = torch.optim.Adam(dp_params, lr=config.lr)
        if item_optimizer_state:
            try:
                inner.load_state_dict(item_optimizer_state)
            except (ValueError, KeyError):
                log.info("Saved DP optimizer state does not fit this model; starting it afresh.")
        self.optimizer = DPOptimizer(
            inner,
            noise_multiplier=config.noise_multiplier,
            max_grad_norm=config.max_grad_norm,
            expected_batch_size=1,  # set per step to q * population, see step()
            loss_reduction="mean",
            generator=torch.Generator().manual_seed(config.seed + 1),
        )

    # ------------------------------------------------------------- one step
    def _sample_generator(self, sample_id: int) -> torch.Generator:
        """Per-sample randomness keyed by (seed, step, sample): a sample's inputs never depend
        on which other samples were drawn, so neighbouring datasets differ in one sample only."""
        key = (self.config.seed * 1_000_003 + self.step_index) * 10_000_019 + int(sample_id)
        return torch.Generator().manual_seed(key % (2**63 - 1))

    def _user_batch(self, histories: UserHistories, rows: np.ndarray, device) -> tuple:
        cfg = self.config
        histories_out, positives, negatives = [], [], []
        for u in rows:
            g = self._sample_generator(u)
            items, weights = torch.as_tensor(histories.items_of(u)), torch.as_tensor(histories.weights_of(u))
            one = drop_history(pad_histories([histories.items_of(u)], cfg.history_len), cfg.history_dropout, g)
            histories_out.append(one[0])
            positives.append(items[torch.multinomial(weights, cfg.positives, replacement=True, generator=g)])
            negatives.append(sample_negatives(1, cfg.num_negatives, self.model.config.num_items, generator=g)[0])
        width = max((len(h) for h in histories_out), default=1)
        history = torch.full((len(rows), width), PAD, dtype=torch.long)
        for i, h in enumerate(histories_out):
            history[i, : len(h)] = h
        stack = (lambda xs, n: torch.stack(xs) if xs else torch.zeros((0, n), dtype=torch.long))  # noqa: E731
        return (history.to(device), stack(positives, cfg.positives).to(device),
                stack(negatives, cfg.num_negatives).to(device))  # fmt: skip

    def _user_loss(self, histories: UserHistories, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-user loss summed over the batch, and the user-vector leaf (for the private update)."""
        device = self.model.item_tower.id_embedding.weight.device
        history, positives, negatives = self._user_batch(histories, rows, device)
        candidates = torch.cat([positives, negatives], dim=1)  # B x (P + M)
        user_rows = torch.as_tensor(rows, dtype=torch.long, device=device)
        free = None
        if self.model.user_tower.embedding is not None:
            free = self.model.user_tower.embedding.weight[user_rows].detach().clone().requires_grad_(True)
        scores = self.module(user_rows, history, candidates, free)  # B x (P + M)
        per_user = _multi_positive_softmax(scores, self.config.positives)
        return per_user.sum(), free

    def _interaction_loss(self, samples: InteractionSamples, rows: np.ndarray) -> torch.Tensor:
        device = self.model.item_tower.id_embedding.weight.device
        items = torch.as_tensor(samples.items[rows], dtype=torch.long)
        negatives = torch.stack([
            sample_negatives(1, self.config.num_negatives, self.model.config.num_items,
                             positives=items[i : i + 1], generator=self._sample_generator(row))[0]
            for i, row in enumerate(rows)
        ])  # fmt: skip
        candidates = torch.cat([items.view(-1, 1), negatives], dim=1).to(device)
        user_rows = torch.as_tensor(samples.users[rows], dtype=torch.long, device=device)
        no_history = torch.full((len(rows), 1), PAD, dtype=torch.long, device=device)
        scores = self.module(user_rows, no_history, candidates)  # B x (1 + M)
        weights = torch.as_tensor(samples.weights[rows], device=device)
        return (-torch.log_softmax(scores, dim=-1)[:, 0] * weights).sum()

    def step(self, histories: UserHistories, samples: InteractionSamples | None) -> int:
        """One DP-SGD step; returns the Poisson batch size (0 is a noise-only step)."""
        cfg = self.config
        if cfg.unit == "user":
            population = np.flatnonzero(histories.lengths() > 0)
        else:
            population = np.arange(len(samples))
        rows = population[_poisson(len(population), cfg.sample_rate, self.generator)]
        self.step_index += 1
        self.optimizer.zero_grad(set_to_none=True)
        if len(rows) == 0:
            for p in self.optimizer.params:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        else:
            if cfg.unit == "user":
                loss, free = self._user_loss(histories, rows)
            else:
                loss, free = self._interaction_loss(samples, rows), None
            loss.backward()
            if free is not None and free.grad is not None:
                self._update_users(rows, free.grad)
        # Sum of clipped per-sample gradients + noise, divided by the expected batch size
        # (a constant, so the division is post-processing).
        self.optimizer.expected_batch_size = max(1.0, cfg.sample_rate * len(population))
        self.optimizer.step()
        return len(rows)

    def _update_users(self, rows: np.ndarray, grad: torch.Tensor) -> None:
        """A non-private step on each sampled user's own embedding, from that user's loss only."""
        self.user_optimizer.step(torch.as_tensor(rows, device=grad.device), grad)

    def run(self, histories: UserHistories) -> dict:
        samples = InteractionSamples.from_histories(histories) if self.config.unit == "interaction" else None
        self.model.train()
        sizes = [self.step(histories, samples) for _ in range(self.config.steps)]
        self.model.eval()
        return {"steps": self.config.steps, "mean_batch": float(np.mean(sizes)) if sizes else 0.0}

    def item_optimizer_state(self) -> dict:
        """The DP optimizer's own moments (post-processing of noisy gradients), for the next round."""
        state = self.optimizer.original_optimizer.state_dict()
        return {
            "state": {k: {n: (v.detach().cpu() if torch.is_tensor(v) else v) for n, v in s.items()}
                      for k, s in state["state"].items()},  # fmt: skip
            "param_groups": state["param_groups"],
        }

    def detach(self) -> None:
        """Remove Opacus hooks so the model can be used (and saved) as a plain module."""
        self.module.remove_hooks()
        for parameter in self.model.parameters():
            parameter.grad_sample = None
            parameter.summed_grad = None
        if self.model.user_tower.embedding is not None:
            self.model.user_tower.embedding.weight.requires_grad_(True)


class RowAdam:
    """Adam with L2 on the rows of a table that a step touched, and on no other row.

    A user's embedding then moves only when that user was sampled, from that
    user's own loss: nothing about other users reaches it.
    """

    def __init__(self, table: torch.Tensor, *, lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):  # fmt: skip
        self.table, self.lr, self.weight_decay, self.betas, self.eps = table, lr, weight_decay, betas, eps
        self.m = torch.zeros_like(table)
        self.v = torch.zeros_like(table)
        self.t = torch.zeros(table.shape[0], device=table.device)

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        grad = grad + self.weight_decay * self.table[rows]
        self.t[rows] += 1
        self.m[rows] = beta1 * self.m[rows] + (1 - beta1) * grad
        self.v[rows] = beta2 * self.v[rows] + (1 - beta2) * grad * grad
        m_hat = self.m[rows] / (1 - beta1 ** self.t[rows]).unsqueeze(-1)
        v_hat = self.v[rows] / (1 - beta2 ** self.t[rows]).unsqueeze(-1)
        self.table[rows] -= self.lr * m_hat / (v_hat.sqrt() + self.eps)


def _multi_positive_softmax(scores: torch.Tensor, positives: int) -> torch.Tensor:
    """Mean over each row's P positives of -log softmax(positive vs the row's negatives) -> B."""
    pos, neg = scores[:, :positives], scores[:, positives:]  # B x P, B x M
    neg_lse = torch.logsumexp(neg, dim=-1, keepdim=True)  # B x 1
    return (torch.logaddexp(pos, neg_lse) - pos).mean(-1)
