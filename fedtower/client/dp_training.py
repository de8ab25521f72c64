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

Two paths compute the same mechanism:

- "sparse" (the default): the embedding tables (item ids, item bias, and the
  user table at the interaction level) are trained by SGD with lazily drawn
  noise (`fedtower.privacy.sparse_tables`): a step costs the rows its batch
  read, and the released tables have exactly the distribution of dense DP-SGD.
  Per-sample norms add the touched-row norms of the tables to Opacus's
  per-sample gradients of the dense layers (the content MLP), and one clip
  factor per sample applies to both.
- "opacus": Opacus hooks over the whole model and dense noise on every row.
  It is the reference the sparse path is tested against, and the only path
  that allows Adam on the tables.

In both, the dense layers take DP-Adam steps at `lr` (post-processing of the
noisy gradient) and the loss is a per-sample sum, so each sample's gradient
is its own whatever the batch size.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from fedtower.config import check_embedding_path
from fedtower.data.prepared import UserHistories
from fedtower.models.two_tower import PAD, TwoTower, drop_history, pad_histories
from fedtower.privacy.quantization import quantize_and_sum
from fedtower.privacy.secure_random import DPRandom
from fedtower.privacy.sparse_tables import LazyNoiseTable, clip_factors, per_sample_row_grads

log = logging.getLogger("fedtower.client")

UNITS = ("user", "interaction")
UNCLIPPED = 1e30  # the clipping bound of the test-only no-clipping hook
NEGATIVES_STREAM = 0x6E65_6773  # "negs": tags the shared-negatives random stream


def _backward(loss: torch.Tensor) -> None:
    """loss.backward() without torch's notice that Opacus's full backward hooks fire on outputs only.

    The model's first layer reads integer ids, so no input needs a gradient; the per-sample
    gradients of the parameters come from the output gradients, which is what the hooks capture
    (tests/test_dp_training.py checks them against a per-sample reference)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                "respect to module outputs", category=UserWarning)  # fmt: skip
        loss.backward()


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
    embedding_path: str = "sparse"  # "sparse" (lazy noise on touched rows) | "opacus" (dense)
    table_optimizer: str = "sgd"
    table_lr: float = 0.5
    # The expected batch size the noisy sum is divided by: public (q x the public population), so the
    # scale of the released noise says nothing about the private number of samples. None: q x n.
    batch_divisor: float | None = None
    negative_items: int = 0  # shared negatives from the first N item rows (0: the whole catalogue)
    # Test-only hooks that break DP on purpose (node config test-only-...; the ledger names them).
    test_only_noise_scale: float = 1.0
    test_only_no_clipping: bool = False

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
        check_embedding_path(self.embedding_path, self.table_optimizer)
        if not self.table_lr > 0:
            raise ValueError(f"dp-table-lr must be positive, got {self.table_lr}.")
        if self.batch_divisor is not None and not self.batch_divisor > 0:
            raise ValueError(f"The batch divisor must be positive, got {self.batch_divisor}.")


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


class SecureNoiseDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer with its Gaussian noise drawn from fedtower's secure source.

    Opacus's own `secure_mode` needs torchcsprng; this draws the same kind of noise (four
    draws summed, from a cryptographic generator) from `DPRandom`.
    """

    def __init__(self, *args, randomness: DPRandom, noise_std: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.randomness = randomness
        self.noise_std = noise_std  # sigma x C (the clipping bound may differ under a test-only hook)

    def add_noise(self) -> None:
        std = self.noise_std
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + self.randomness.gaussian_like(p.summed_grad, std)).view_as(p)
            _mark_as_processed(p.summed_grad)


class DPTrainer:
    """Runs `config.steps` DP-SGD steps on `model` for one round.

    `randomness`: where the Poisson samples and every noise value come from. By default a
    fresh `DPRandom` keyed from the OS; tests pass `DPRandom.test_only_seeded(...)`.
    """

    def __init__(self, model: TwoTower, config: DPConfig, *, randomness: DPRandom | None = None,
                 item_optimizer_state: dict | None = None):  # fmt: skip
        self.model = model
        self.config = config
        randomness = DPRandom() if randomness is None else randomness
        self.randomness_source = randomness.source
        # Separate streams, so that how much noise one path draws never changes which samples are drawn.
        self.sampler = randomness.spawn("poisson")
        self.randomness = randomness.spawn("noise")
        # Shared negatives and per-sample augmentation: not what DP relies on, but secret all the same.
        self.stream_seed = randomness.spawn("streams").integer_seed()
        self.step_index = 0
        user_table = model.user_tower.embedding
        if config.unit == "user" and user_table is not None:
            # Outside the DP step: frozen for the DP step, updated from each user's own loss.
            user_table.weight.requires_grad_(False)
            self.user_optimizer = RowAdam(user_table.weight, lr=config.lr, weight_decay=config.user_l2)
        else:
            self.user_optimizer = None
        # Tables read with the same ids share their lazy-noise bookkeeping (sparse path).
        groups = [[t for t in (model.item_tower.id_embedding, model.item_tower.bias) if t is not None]]
        if config.unit == "interaction" and user_table is not None:
            groups.append([user_table])
        tables = [t for group in groups for t in group]
        table_params = {id(t.weight) for t in tables}
        self.dense_params = [p for p in model.parameters() if p.requires_grad and id(p) not in table_params]
        self.dense_optimizer = torch.optim.Adam(self.dense_params, lr=config.lr) if self.dense_params else None
        if config.embedding_path == "sparse":
            self.tables = [LazyNoiseTable(*group, randomness=self.randomness) for group in groups]
            self.table_optimizer = None
            # Opacus computes per-sample gradients of the dense layers only; the tables are read
            # through their own hooks.
            dense_modules = [model.item_tower.content_mlp] if model.item_tower.content_mlp is not None else []
            self.hooked = [GradSampleModule(m, loss_reduction="sum") for m in dense_modules]
            self.noise_engine = None
        else:
            self.tables = []
            table_weights = [t.weight for t in tables]
            make = torch.optim.SGD if config.table_optimizer == "sgd" else torch.optim.Adam
            self.table_optimizer = make(table_weights, lr=config.table_lr)
            self.hooked = [GradSampleModule(model, loss_reduction="sum")]
            # Opacus clips and noises every DP parameter; the table and dense optimizers then step.
            self.noise_engine = SecureNoiseDPOptimizer(
                torch.optim.SGD(table_weights + self.dense_params, lr=0.0),
                noise_multiplier=config.noise_multiplier,
                max_grad_norm=UNCLIPPED if config.test_only_no_clipping else config.max_grad_norm,
                noise_std=config.noise_multiplier * config.max_grad_norm * config.test_only_noise_scale,
                expected_batch_size=1,  # set per step to q * population, see step()
                loss_reduction="mean",  # divides the noisy sum by expected_batch_size
                randomness=self.randomness,
            )
        # Tests and audits may look at each step before its noise (never saved or sent):
        # inspect({"per_sample": B x P, "clipped_sum": P}) over the DP parameters in `dp_names`.
        self.inspect = None
        dp_ids = table_params | {id(p) for p in self.dense_params}
        self.dp_names = [n for n, p in model.named_parameters() if id(p) in dp_ids]
        if item_optimizer_state:
            self._load_optimizer_state(item_optimizer_state)

    def _load_optimizer_state(self, saved: dict) -> None:
        try:
            if self.dense_optimizer is not None and saved.get("dense"):
                self.dense_optimizer.load_state_dict(saved["dense"])
            if self.table_optimizer is not None and saved.get("tables"):
                self.table_optimizer.load_state_dict(saved["tables"])
        except (ValueError, KeyError, TypeError):
            log.info("Saved DP optimizer state does not fit this model; starting it afresh.")

    # ------------------------------------------------------------- one step
    def _sample_generator(self, sample_id: int) -> torch.Generator:
        """Per-sample randomness keyed by (seed, step, sample): a sample's inputs never depend
        on which other samples were drawn, so neighbouring datasets differ in one sample only."""
        key = (self.stream_seed * 1_000_003 + self.step_index) * 10_000_019 + int(sample_id)
        return torch.Generator().manual_seed(key % (2**63 - 1))

    def _shared_negatives(self, device) -> torch.Tensor:
        """This step's M negatives, shared by every sample in it: drawn from (secret seed, step)
        alone, never from the data, so they add no sensitivity (and a step reads few distinct rows)."""
        # A key space of its own (sample keys are (seed, step, sample id)).
        key = np.random.SeedSequence([NEGATIVES_STREAM, self.stream_seed, self.step_index]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(key))
        pool = min(self.config.negative_items or self.model.config.num_items, self.model.config.num_items)
        negatives = torch.randint(pool, (self.config.num_negatives,), generator=generator)
        return negatives.to(device)

    def _user_batch(self, histories: UserHistories, rows: np.ndarray, device) -> tuple:
        cfg = self.config
        histories_out, positives = [], []
        for u in rows:
            g = self._sample_generator(u)
            items, weights = torch.as_tensor(histories.items_of(u)), torch.as_tensor(histories.weights_of(u))
            one = drop_history(pad_histories([histories.items_of(u)], cfg.history_len), cfg.history_dropout, g)
            histories_out.append(one[0])
            positives.append(items[torch.multinomial(weights, cfg.positives, replacement=True, generator=g)])
        width = max((len(h) for h in histories_out), default=1)
        history = torch.full((len(rows), width), PAD, dtype=torch.long)
        for i, h in enumerate(histories_out):
            history[i, : len(h)] = h
        stack = (lambda xs, n: torch.stack(xs) if xs else torch.zeros((0, n), dtype=torch.long))  # noqa: E731
        return history.to(device), stack(positives, cfg.positives).to(device)

    def _user_loss(self, histories: UserHistories, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-user loss summed over the batch, and the user-vector leaf (for the private update)."""
        device = self.model.item_tower.id_embedding.weight.device
        history, positives = self._user_batch(histories, rows, device)
        negatives = self._shared_negatives(device)  # M
        candidates = torch.cat([positives, negatives.expand(len(rows), -1)], dim=1)  # B x (P + M)
        # A shared negative that is one of this user's positives is not a negative for them.
        clash = (positives.unsqueeze(2) == negatives.view(1, 1, -1)).any(1)  # B x M
        user_rows = torch.as_tensor(rows, dtype=torch.long, device=device)
        free = None
        if self.model.user_tower.embedding is not None:
            free = self.model.user_tower.embedding.weight[user_rows].detach().clone().requires_grad_(True)
        scores = self.model(user_rows, history, candidates, free)  # B x (P + M)
        per_user = _multi_positive_softmax(scores, self.config.positives, clash)
        return per_user.sum(), free

    def _interaction_loss(self, samples: InteractionSamples, rows: np.ndarray) -> torch.Tensor:
        device = self.model.item_tower.id_embedding.weight.device
        items = torch.as_tensor(samples.items[rows], dtype=torch.long, device=device)
        negatives = self._shared_negatives(device)  # M
        candidates = torch.cat([items.view(-1, 1), negatives.expand(len(rows), -1)], dim=1)  # B x (1 + M)
        user_rows = torch.as_tensor(samples.users[rows], dtype=torch.long, device=device)
        no_history = torch.full((len(rows), 1), PAD, dtype=torch.long, device=device)
        scores = self.model(user_rows, no_history, candidates)  # B x (1 + M)
        clash = candidates[:, 1:] == items.view(-1, 1)  # the event's own item drawn as a negative
        scores = torch.cat([scores[:, :1], scores[:, 1:].masked_fill(clash, float("-inf"))], dim=1)
        weights = torch.as_tensor(samples.weights[rows], device=device)
        return (-torch.log_softmax(scores, dim=-1)[:, 0] * weights).sum()

    def step(self, histories: UserHistories, samples: InteractionSamples | None) -> int:
        """One DP-SGD step; returns the Poisson batch size (0 is a noise-only step)."""
        cfg = self.config
        if cfg.unit == "user":
            population = np.flatnonzero(histories.lengths() > 0)
        else:
            population = np.arange(len(samples))
        rows = population[self.sampler.poisson_sample(len(population), cfg.sample_rate)]
        self.step_index += 1
        self.model.train()  # per-sample hooks capture in training mode only
        self.zero_grads()
        if len(rows) > 0:
            if cfg.unit == "user":
                loss, free = self._user_loss(histories, rows)
            else:
                loss, free = self._interaction_loss(samples, rows), None
            _backward(loss)  # a per-sample sum: each sample's gradient is its own
            if free is not None and free.grad is not None:
                self._update_users(rows, free.grad)
        divisor = cfg.batch_divisor if cfg.batch_divisor is not None else max(1.0, cfg.sample_rate * len(population))
        self.private_update(len(rows), expected_batch=divisor)
        return len(rows)

    def private_update(self, batch: int, *, expected_batch: float) -> None:
        """The DP update from the last backward over `batch` samples: the noisy sum of clipped
        per-sample gradients, divided by the expected batch size (a constant, so post-processing)."""
        if self.noise_engine is not None:
            self._opacus_step(batch, expected_batch)
        else:
            self._sparse_step(batch, expected_batch)
        if self.dense_optimizer is not None:
            self.dense_optimizer.step()
        if self.table_optimizer is not None:
            self.table_optimizer.step()

    def zero_grads(self) -> None:
        for p in self.dense_params:
            p.grad, p.grad_sample = None, None
        if self.noise_engine is not None:
            self.noise_engine.zero_grad(set_to_none=True)

    def _opacus_step(self, batch: int, expected_batch: float) -> None:
        if batch == 0:
            for p in self.noise_engine.params:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        engine = self.noise_engine
        engine.expected_batch_size = expected_batch
        # Opacus's pre_step, spelled out so the pre-noise sum can be inspected.
        engine.clip_and_accumulate()
        if self.inspect is not None:
            per_sample = self._in_dp_order({id(p): p.grad_sample for p in engine.params})
            summed = self._in_dp_order({id(p): p.summed_grad.unsqueeze(0) for p in engine.params})
            flat = _flat(per_sample, batch)
            self.inspect({"per_sample": flat, "clipped_sum": _flat(summed, 1)[0],
                          "squared_norms": flat.pow(2).sum(1)})  # fmt: skip
        engine.add_noise()
        engine.scale_grad()  # sets p.grad = (sum + noise) / expected_batch

    def _sparse_step(self, batch: int, expected_batch: float) -> None:
        cfg = self.config
        noise_std = cfg.noise_multiplier * cfg.max_grad_norm * cfg.test_only_noise_scale
        device = self.model.item_tower.id_embedding.weight.device
        squared = torch.zeros(batch, device=device)
        per_table = [table.batch_reads() if batch else None for table in self.tables]
        for table, reads in zip(self.tables, per_table):
            if reads is not None:
                squared += table.squared_norms(reads)
        for p in self.dense_params:
            if batch and p.grad_sample is not None:
                squared += p.grad_sample.reshape(batch, -1).pow(2).sum(1)
        clip = clip_factors(squared, cfg.max_grad_norm)  # one factor per sample, over all parameters
        if cfg.test_only_no_clipping:
            clip = torch.ones_like(clip)
        if self.inspect is not None:
            self._inspect_sparse(batch, per_table, clip, squared)
        for table, reads in zip(self.tables, per_table):
            table.step(reads, clip, lr=cfg.table_lr, noise_std=noise_std, batch_divisor=expected_batch)
        # One draw for all dense parameters (each call to the secure source has a fixed cost).
        sizes = [p.numel() for p in self.dense_params]
        noise = self.randomness.standard_normal(sum(sizes), device=device).split(sizes) if sizes else []
        for p, z in zip(self.dense_params, noise):
            summed = torch.zeros_like(p)
            if batch and p.grad_sample is not None:
                summed = torch.einsum("i,i...->...", clip, p.grad_sample)
            p.grad = (summed + noise_std * z.view_as(p).to(p.dtype)) / expected_batch
            p.grad_sample = None

    def integer_user_sum(self, histories: UserHistories, *, keys: list[str], l2_bound: int) -> tuple[torch.Tensor, int]:
        """One federation-wide DP step's share from this site, before noise: the sum over its Poisson-sampled
        users of each user's clipped item-tower gradient, quantized to integers with L2 norm <= `l2_bound`
        (`fedtower.privacy.quantization`), as one int64 vector over the parameters `keys`, in that order.

        Sampled users' own embeddings take their private step here, as in `step`. Returns (vector, batch);
        the batch size is private (never released)."""
        cfg = self.config
        params = dict(self.model.named_parameters())
        offsets, length = {}, 0
        for key in keys:
            offsets[key], length = length, length + params[key].numel()
        population = np.flatnonzero(histories.lengths() > 0)
        rows = population[self.sampler.poisson_sample(len(population), cfg.sample_rate)]
        self.step_index += 1
        self.model.train()
        self.zero_grads()
        batch = len(rows)
        if batch == 0:
            return torch.zeros(length, dtype=torch.long), 0
        loss, free = self._user_loss(histories, rows)
        _backward(loss)
        if free is not None and free.grad is not None:
            self._update_users(rows, free.grad)
        per_table = [table.batch_reads() for table in self.tables]
        squared = torch.zeros(batch)
        for table, reads in zip(self.tables, per_table):
            if reads is not None:
                squared += table.squared_norms(reads).cpu()
        for p in self.dense_params:
            if p.grad_sample is not None:
                squared += p.grad_sample.reshape(batch, -1).pow(2).sum(1).cpu()
        # Clipped to max-grad-norm, then scaled so that the clipping norm is l2_bound integer units.
        factor = clip_factors(squared, cfg.max_grad_norm).double() * (l2_bound / cfg.max_grad_norm)  # B
        name_of = {id(p): name for name, p in params.items()}
        pieces = []
        for table, reads in zip(self.tables, per_table):
            table.reads = [[] for _ in table.embeddings]
            if reads is None:
                continue
            ids, grads_per_table = reads
            for weight, grads in zip(table.weights, grads_per_table):
                users, table_rows, row_grads = per_sample_row_grads(ids.cpu(), grads.detach().cpu(), table.num_rows)
                dim = weight.shape[1]
                coords = offsets[name_of[id(weight)]] + table_rows.unsqueeze(1) * dim + torch.arange(dim)  # K x d
                pieces.append((users.repeat_interleave(dim), coords.reshape(-1),
                               (row_grads.double() * factor[users].unsqueeze(1)).reshape(-1)))  # fmt: skip
        for p in self.dense_params:
            if p.grad_sample is None:
                continue
            size = p.numel()
            grads = p.grad_sample.detach().cpu().reshape(batch, size).double() * factor.unsqueeze(1)
            pieces.append((torch.arange(batch).repeat_interleave(size),
                           offsets[name_of[id(p)]] + torch.arange(size).repeat(batch), grads.reshape(-1)))  # fmt: skip
            p.grad_sample = None
        users, coords, values = (torch.cat(part) for part in zip(*pieces))
        uniforms = torch.from_numpy(self.randomness.uniform(len(values)))
        total = quantize_and_sum(users, coords, values, uniforms, batch=batch, length=length, l2_bound=l2_bound)
        return total, batch

    def _inspect_sparse(self, batch: int, per_table: list, clip: torch.Tensor, squared: torch.Tensor) -> None:
        """Dense per-sample gradients in `dp_names` order (test and audit only: O(B x table))."""
        by_param = {}
        for table, reads in zip(self.tables, per_table):
            for index, weight in enumerate(table.weights):
                full = torch.zeros(batch, *weight.shape, device=weight.device)
                if reads is not None:
                    ids, grads = reads[0], reads[1][index]
                    samples, rows, row_grads = per_sample_row_grads(ids, grads, table.num_rows)
                    full.index_put_((samples, rows), row_grads, accumulate=True)
                by_param[id(weight)] = full
        for p in self.dense_params:
            by_param[id(p)] = p.grad_sample if p.grad_sample is not None else torch.zeros(batch, *p.shape)
        per_sample = _flat(self._in_dp_order(by_param), batch)
        self.inspect({"per_sample": per_sample, "clipped_sum": (per_sample * clip.unsqueeze(1)).sum(0),
                      "squared_norms": squared})  # fmt: skip

    def _in_dp_order(self, by_param: dict) -> list[torch.Tensor]:
        return [by_param[id(p)] for _, p in self.model.named_parameters() if id(p) in by_param]

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
        """The DP optimizers' own state (post-processing of noisy gradients), for the next round."""
        return {
            "dense": _cpu_state(self.dense_optimizer) if self.dense_optimizer is not None else {},
            "tables": _cpu_state(self.table_optimizer) if self.table_optimizer is not None else {},
        }

    def release(self) -> None:
        """Apply every row's pending noise: after this the tables may be read, saved and sent."""
        for table in self.tables:
            table.release()

    def detach(self) -> None:
        """Apply all pending noise and remove every hook, so the model is a plain module again."""
        for table in self.tables:
            table.detach()
        for hooked in self.hooked:
            hooked.remove_hooks()
        for parameter in self.model.parameters():
            parameter.grad_sample = None
            parameter.summed_grad = None
        if self.model.user_tower.embedding is not None:
            self.model.user_tower.embedding.weight.requires_grad_(True)


def _flat(per_sample: list[torch.Tensor], batch: int) -> torch.Tensor:
    # The width from the shape, not -1: an empty Poisson batch (B = 0) cannot infer it.
    return torch.cat([g.reshape(batch, math.prod(g.shape[1:])) for g in per_sample], dim=1)  # B x P


def _cpu_state(optimizer: torch.optim.Optimizer) -> dict:
    state = optimizer.state_dict()
    return {
        "state": {k: {n: (v.detach().cpu() if torch.is_tensor(v) else v) for n, v in s.items()}
                  for k, s in state["state"].items()},  # fmt: skip
        "param_groups": state["param_groups"],
    }


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


def _multi_positive_softmax(scores: torch.Tensor, positives: int, excluded: torch.Tensor) -> torch.Tensor:
    """Mean over each row's P positives of -log softmax(positive vs the row's negatives) -> B.

    `excluded` (B x M) marks negatives that are not negatives for that row."""
    pos, neg = scores[:, :positives], scores[:, positives:].masked_fill(excluded, float("-inf"))  # B x P, B x M
    neg_lse = torch.logsumexp(neg, dim=-1, keepdim=True)  # B x 1
    return (torch.logaddexp(pos, neg_lse) - pos).mean(-1)
