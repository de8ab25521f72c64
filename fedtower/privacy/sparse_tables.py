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

from fedtower.privacy.secure_random import DPRandom

FLUSH_CHUNK_ROWS = 1 << 17  # bounds the memory of drawing a whole table's pending noise
GRAM_MAX_READS = 256  # per-sample norms by Gram matrix up to this many reads per sample (B x S x S)


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


def per_sample_squared_norms(ids: torch.Tensor, output_grads: torch.Tensor, num_rows: int) -> torch.Tensor:
    """||sample i's full gradient on the table||^2 for each i -> B, from its reads alone.

    Reads of the same row add up before the norm: ||sum_j g_j e_(id_j)||^2 is the sum of
    <g_j, g_k> over the pairs of reads j, k of the same row (a Gram matrix, B x S x S).
    """
    batch = ids.shape[0]
    ids, grads = ids.reshape(batch, -1), output_grads.reshape(batch, ids[0].numel(), -1)
    if ids.shape[1] > GRAM_MAX_READS:  # the Gram matrix would be large: aggregate per row instead
        samples, _, row_grads = per_sample_row_grads(ids, grads, num_rows)
        return grads.new_zeros(batch).index_add_(0, samples, row_grads.pow(2).sum(1))
    same_row = ids.unsqueeze(2) == ids.unsqueeze(1)  # B x S x S
    gram = grads @ grads.transpose(1, 2)  # B x S x S
    return (gram * same_row).sum((1, 2))


def clip_factors(squared_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus's per-sample clip factor min(1, C / (norm + 1e-6))."""
    return (max_grad_norm / (squared_norms.sqrt() + 1e-6)).clamp(max=1.0)


class LazyNoiseTable:
    """Embedding tables trained by DP-SGD with noise drawn only when a row is read.

    One instance owns tables that are always read with the same ids (the item
    id embedding and the item bias): they share the bookkeeping of which row
    owes how much noise, and the per-sample norms add over them.

    While attached, every read goes through hooks: a forward pass first applies
    the pending noise of the rows it reads, `state_dict()` first applies all of
    it, and so does `release()`. In training mode the forward's output is
    swapped for a leaf whose gradient gives the per-sample, per-row gradients
    (the tables' own `.grad` is never formed).
    """

    def __init__(self, *embeddings: nn.Embedding, randomness: DPRandom):
        self.embeddings = list(embeddings)
        self.weights = [e.weight for e in self.embeddings]
        self.weight = self.weights[0]
        self.randomness = randomness  # the secret source every noise value is drawn from
        self.num_rows = self.weight.shape[0]
        if any(w.shape[0] != self.num_rows for w in self.weights):
            raise ValueError("Tables that share lazy noise must have the same number of rows.")
        # Cumulative noise variance of all steps so far, and how much of it each row has had.
        self.variance_so_far = 0.0
        self.row_variance = torch.zeros(self.num_rows, dtype=torch.float64, device=self.weight.device)
        self.reads: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.embeddings]
        self._noised = (None, -1, -1.0)  # (ids, its version, variance) last brought up to date
        self._hooks = []
        for index, embedding in enumerate(self.embeddings):
            self._hooks += [
                embedding.register_forward_pre_hook(self._before_read),
                embedding.register_forward_hook(lambda m, a, o, i=index: self._capture(i, m, a, o)),
                embedding.register_state_dict_pre_hook(lambda *_: self.release()),
            ]

    # ------------------------------------------------------------ reading rows
    @torch.no_grad()
    def apply_pending(self, rows: torch.Tensor) -> None:
        """Add the noise each of `rows` (distinct ids) is owed, drawn once with the summed variance."""
        if rows.numel() == 0 or self.variance_so_far == 0.0:
            return
        std = (self.variance_so_far - self.row_variance.index_select(0, rows)).clamp_(min=0.0).sqrt_()
        std = std.to(self.weight.dtype).unsqueeze(1)  # rows owing nothing get 0
        for weight in self.weights:
            noise = self.randomness.standard_normal((len(rows), weight.shape[1]), dtype=weight.dtype,
                                                    device=weight.device)  # fmt: skip
            weight.index_add_(0, rows, noise.mul_(std))
        self.row_variance.index_fill_(0, rows, self.variance_so_far)

    @torch.no_grad()
    def release(self) -> None:
        """Apply all pending noise (before the tables are evaluated, saved or sent)."""
        for start in range(0, self.num_rows, FLUSH_CHUNK_ROWS):
            rows = torch.arange(start, min(start + FLUSH_CHUNK_ROWS, self.num_rows), device=self.weight.device)
            self.apply_pending(rows)

    def pending_rows(self) -> int:
        """How many rows still owe noise (0 right after `release`)."""
        return int((self.row_variance < self.variance_so_far).sum())

    def _before_read(self, module, args):
        ids = args[0]
        last, version, variance = self._noised
        if ids is last and ids._version == version and variance == self.variance_so_far:
            return  # the same ids were just brought up to date (the bias read after the id table)
        self.apply_pending(torch.unique(ids))
        self._noised = (ids, ids._version, self.variance_so_far)

    def _capture(self, index, module, args, output):
        if not (module.training and torch.is_grad_enabled()):
            return None
        leaf = output.detach().requires_grad_(True)
        self.reads[index].append((args[0], leaf))
        return leaf

    # ----------------------------------------------------------- one DP step
    def batch_reads(self) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """This step's reads: ids B x S, and for each table the loss gradient at each read,
        B x S x d; None if nothing was read."""
        first = self.reads[0]
        if not first or all(leaf.grad is None for reads in self.reads for _, leaf in reads):
            return None
        if any(len(reads) != len(first) or any(i is not j for (i, _), (j, _) in zip(reads, first))
               for reads in self.reads):  # fmt: skip
            raise RuntimeError("Tables that share lazy noise were read with different ids.")
        batch = first[0][0].shape[0]
        ids = torch.cat([i.reshape(batch, -1) for i, _ in first], dim=1) if len(first) > 1 \
            else first[0][0].reshape(batch, -1)  # fmt: skip
        per_table = []
        for reads in self.reads:
            grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for _, leaf in reads]
            grads = [g.reshape(batch, -1, g.shape[-1]) for g in grads]
            per_table.append(torch.cat(grads, dim=1) if len(grads) > 1 else grads[0])
        return ids, per_table

    def squared_norms(self, reads: tuple[torch.Tensor, list[torch.Tensor]]) -> torch.Tensor:
        """Per-sample squared norms of the gradient on all these tables -> B."""
        ids, per_table = reads
        if ids.shape[1] == 1:  # one read per sample (the user table): nothing can repeat
            return sum(g.pow(2).sum((1, 2)) for g in per_table)
        ordered = ids.sort(dim=1).values
        if not bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            # Every sample read distinct rows: its norm is the sum over its reads.
            return sum(g.pow(2).sum((1, 2)) for g in per_table)
        return sum(per_sample_squared_norms(ids, g, self.num_rows) for g in per_table)

    @torch.no_grad()
    def step(self, reads, clip: torch.Tensor | None, *, lr: float, noise_std: float,
             batch_divisor: float) -> None:  # fmt: skip
        """theta[r] -= lr / B * (sum_i clip_i g_ir + N(0, noise_std^2)) for every row r.

        The clipped sum moves the rows the batch read, now; every row's noise for this step
        (read or not) is owed, and drawn when the row is next read.
        """
        if reads is not None:
            ids, per_table = reads
            # The step size is folded into the scale: `index_add_` with alpha != 1 takes a per-index
            # slow path on CPU (4x to 14x slower here).
            flat_ids, scale = ids.flatten(), clip.view(-1, 1, 1) * (-lr / batch_divisor)
            for weight, grads in zip(self.weights, per_table):
                update = grads.mul_(scale)  # in place: this step is the gradients' last use
                weight.index_add_(0, flat_ids, update.view(-1, weight.shape[1]))
        self.variance_so_far += (lr * noise_std / batch_divisor) ** 2
        self.reads = [[] for _ in self.embeddings]

    def detach(self) -> None:
        """Apply every pending noise and remove the hooks: the tables are plain embeddings again."""
        self.release()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.reads = [[] for _ in self.embeddings]
        self._noised = (None, -1, -1.0)
