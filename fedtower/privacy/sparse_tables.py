"""DP-SGD for embedding tables at the cost of the rows a batch touches.

Dense DP-SGD adds Gaussian noise N(0, (lr * sigma * C / B)^2) to every row of
a table at every step. With plain SGD on the table, a row that no batch read
moves by that noise alone, and nothing observes it until it is next read. A sum
of independent Gaussians is Gaussian with the summed variance, so the noise of
all the steps since a row was last read can be drawn at once, just before the
row is read again (a forward pass, evaluation, `state_dict`, release). The
table is then distributed exactly as under dense DP-SGD with the same noise
multiplier, clip bound, sampling and steps, while a step costs the rows it
touches, not the catalogue.

Per-sample gradient norms come from the rows each sample read: a sample's
gradient on a table is zero outside those rows, so summing its per-position
output gradients per (sample, row) gives exactly its full per-sample gradient.

What is exact, and so supported on tables: SGD with any per-step learning
rate, no momentum, no weight decay. Adam, Adagrad and momentum keep per-row
state that the noise of unread rows would have moved (Adam's second moment is
not even linear in it), so lazily drawn noise would not match dense DP-SGD:
they are refused (`fedtower.config.check_embedding_path`), never approximated.
"""

from __future__ import annotations

import torch
import torch.nn as nn

FLUSH_CHUNK_ROWS = 1 << 17  # bounds the memory of drawing a whole table's pending noise


def per_sample_row_grads(
    ids: torch.Tensor, output_grads: torch.Tensor, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A table's per-sample gradient in sparse form.

    ids: B x S row ids read by each sample; output_grads: B x S x d, the gradient
    of the loss at each read. Returns (sample K, row K, grad K x d) with one
    entry per distinct (sample, row): sample i's full gradient on the table is
    `grad` at its rows and zero elsewhere.
    """
    batch, dim = ids.shape[0], output_grads.shape[-1]
    ids = ids.reshape(batch, -1)
    samples = torch.arange(batch, device=ids.device).unsqueeze(1)  # B x 1
    keys = (samples * num_rows + ids).flatten()  # B*S, one key per (sample, row)
    unique, inverse = torch.unique(keys, return_inverse=True)
    grads = output_grads.new_zeros(len(unique), dim).index_add_(0, inverse, output_grads.reshape(-1, dim))
    return unique // num_rows, unique % num_rows, grads


def clip_factors(squared_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus's per-sample clip factor min(1, C / (norm + 1e-6))."""
    return (max_grad_norm / (squared_norms.sqrt() + 1e-6)).clamp(max=1.0)


class LazyNoiseTable:
    """An nn.Embedding trained by DP-SGD with noise drawn only when a row is read.

    While attached, every read of the table goes through hooks: a forward pass
    first applies the pending noise of the rows it reads, `state_dict()` first
    applies all of it; `release()` applies all of it. In training mode the
    forward's output is swapped for a leaf whose gradient gives the per-sample,
    per-row gradients (the table's own `.grad` is never formed).
    """

    def __init__(self, embedding: nn.Embedding, *, generator: torch.Generator):
        self.embedding = embedding
        self.weight = embedding.weight
        self.generator = generator
        self.num_rows = self.weight.shape[0]
        # Cumulative noise variance of all steps so far, and how much of it each row has had.
        self.variance_so_far = 0.0
        self.row_variance = torch.zeros(self.num_rows, dtype=torch.float64, device=self.weight.device)
        self.reads: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._hooks = [
            embedding.register_forward_pre_hook(self._before_read),
            embedding.register_forward_hook(self._capture),
            embedding.register_state_dict_pre_hook(lambda *_: self.release()),
        ]

    # ------------------------------------------------------------ reading rows
    @torch.no_grad()
    def apply_pending(self, rows: torch.Tensor) -> None:
        """Add the noise each of `rows` (distinct ids) is owed, drawn once with the summed variance."""
        if rows.numel() == 0:
            return
        pending = (self.variance_so_far - self.row_variance[rows]).clamp(min=0.0)
        owed = pending > 0
        if not bool(owed.any()):
            return
        rows, pending = rows[owed], pending[owed]
        noise = torch.randn(len(rows), self.weight.shape[1], generator=self.generator,
                            device=self.weight.device, dtype=self.weight.dtype)  # fmt: skip
        self.weight[rows] += noise * pending.sqrt().to(self.weight.dtype).unsqueeze(1)
        self.row_variance[rows] = self.variance_so_far

    @torch.no_grad()
    def release(self) -> None:
        """Apply all pending noise (before the table is evaluated, saved or sent)."""
        for start in range(0, self.num_rows, FLUSH_CHUNK_ROWS):
            rows = torch.arange(start, min(start + FLUSH_CHUNK_ROWS, self.num_rows), device=self.weight.device)
            self.apply_pending(rows)

    def pending_rows(self) -> int:
        """How many rows still owe noise (0 right after `release`)."""
        return int((self.row_variance < self.variance_so_far).sum())

    def _before_read(self, module, args):
        self.apply_pending(torch.unique(args[0]).clamp(min=0))

    def _capture(self, module, args, output):
        if not (module.training and torch.is_grad_enabled()):
            return None
        leaf = output.detach().requires_grad_(True)
        self.reads.append((args[0], leaf))
        return leaf

    # ----------------------------------------------------------- one DP step
    def sample_grads(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """This step's per-sample row gradients (sample, row, grad), or None if nothing was read."""
        reads = [(ids, leaf) for ids, leaf in self.reads if leaf.grad is not None]
        if not reads:
            return None
        batch = reads[0][0].shape[0]
        ids = torch.cat([i.reshape(batch, -1) for i, _ in reads], dim=1)
        grads = torch.cat([g.grad.reshape(batch, -1, g.shape[-1]) for _, g in reads], dim=1)
        return per_sample_row_grads(ids, grads, self.num_rows)

    @torch.no_grad()
    def step(self, per_sample, clip: torch.Tensor | None, *, lr: float, noise_std: float,
             batch_divisor: float) -> None:  # fmt: skip
        """theta[r] -= lr / B * (sum_i clip_i g_ir + N(0, noise_std^2)) for the rows read; the
        noise of every other row is owed, and added when the row is next read."""
        if per_sample is not None:
            samples, rows, grads = per_sample
            touched, where = torch.unique(rows, return_inverse=True)
            summed = grads.new_zeros(len(touched), grads.shape[1])
            summed.index_add_(0, where, grads * clip[samples].unsqueeze(1))
            noise = torch.randn(summed.shape, generator=self.generator, device=summed.device, dtype=summed.dtype)
            self.weight[touched] -= (lr / batch_divisor) * (summed + noise_std * noise)
        self.variance_so_far += (lr * noise_std / batch_divisor) ** 2
        if per_sample is not None:
            self.row_variance[touched] = self.variance_so_far
        self.reads.clear()

    def detach(self) -> None:
        """Apply every pending noise and remove the hooks: the table is a plain embedding again."""
        self.release()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.reads.clear()

