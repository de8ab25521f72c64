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

import queue
import threading

import torch
import torch.nn as nn

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


class GaussianStream:
    """Independent N(0, 1) values from one generator, handed out in order.

    PyTorch's CPU generator is serial (several ns a value), and a DP step needs
    d values for every row it reads; on CPU a background thread draws them ahead
    into a short queue, off the step's critical path. The values and their order
    are the generator's own, so a seed reproduces a run. On CUDA they are drawn
    on the device when asked.
    """

    def __init__(self, generator: torch.Generator, *, device: torch.device, dtype: torch.dtype,
                 chunk: int = 1 << 18, ahead: int = 8):  # fmt: skip
        self.generator, self.device, self.dtype, self.chunk = generator, torch.device(device), dtype, chunk
        self._queue: queue.Queue | None = None
        self._ahead = ahead
        self._stop = threading.Event()
        self._buffer = torch.empty(0, dtype=dtype)
        self._offset = 0

    def take(self, count: int) -> torch.Tensor:
        if self.device.type != "cpu":
            return torch.randn(count, generator=self.generator, device=self.device, dtype=self.dtype)
        if self._queue is None:
            self._start()
        parts, needed = [], count
        while needed > 0:
            if self._offset == len(self._buffer):
                self._buffer, self._offset = self._queue.get(), 0
            part = self._buffer[self._offset : self._offset + needed]
            parts.append(part)
            self._offset += len(part)
            needed -= len(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self._ahead)
        threading.Thread(target=self._fill, name="fedtower-dp-noise", daemon=True).start()

    def _fill(self) -> None:
        while not self._stop.is_set():
            values = torch.empty(self.chunk, dtype=self.dtype).normal_(generator=self.generator)
            while not self._stop.is_set():
                try:
                    self._queue.put(values, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def close(self) -> None:
        self._stop.set()


class LazyNoiseTable:
    """An nn.Embedding trained by DP-SGD with noise drawn only when a row is read.

    While attached, every read of the table goes through hooks: a forward pass
    first applies the pending noise of the rows it reads, `state_dict()` first
    applies all of it; `release()` applies all of it. In training mode the
    forward's output is swapped for a leaf whose gradient gives the per-sample,
    per-row gradients (the table's own `.grad` is never formed).
    """

    def __init__(self, embedding: nn.Embedding, *, noise: GaussianStream):
        self.embedding = embedding
        self.weight = embedding.weight
        self.noise = noise
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
        if rows.numel() == 0 or self.variance_so_far == 0.0:
            return
        pending = (self.variance_so_far - self.row_variance.index_select(0, rows)).clamp_(min=0.0)
        noise = self.noise.take(rows.numel() * self.weight.shape[1]).view(len(rows), -1)
        noise = noise * pending.sqrt().to(self.weight.dtype).unsqueeze(1)  # rows owing nothing get 0
        self.weight.index_add_(0, rows, noise)
        self.row_variance.index_fill_(0, rows, self.variance_so_far)

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
    def batch_reads(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This step's reads: ids B x S and the loss gradient at each, B x S x d (None if none)."""
        reads = [(ids, leaf) for ids, leaf in self.reads if leaf.grad is not None]
        if not reads:
            return None
        batch = reads[0][0].shape[0]
        ids = torch.cat([i.reshape(batch, -1) for i, _ in reads], dim=1)
        grads = torch.cat([g.grad.reshape(batch, -1, g.shape[-1]) for _, g in reads], dim=1)
        return ids, grads

    def squared_norms(self, reads: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return per_sample_squared_norms(*reads, self.num_rows)

    @torch.no_grad()
    def step(self, reads, clip: torch.Tensor | None, *, lr: float, noise_std: float,
             batch_divisor: float) -> None:  # fmt: skip
        """theta[r] -= lr / B * (sum_i clip_i g_ir + N(0, noise_std^2)) for every row r.

        The clipped sum moves the rows the batch read, now; every row's noise for this step
        (read or not) is owed, and drawn when the row is next read.
        """
        if reads is not None:
            ids, grads = reads
            clipped = grads * clip.view(-1, 1, 1)  # B x S x d
            self.weight.index_add_(0, ids.flatten(), clipped.reshape(-1, grads.shape[-1]),
                                   alpha=-lr / batch_divisor)  # fmt: skip
        self.variance_so_far += (lr * noise_std / batch_divisor) ** 2
        self.reads.clear()

    def detach(self) -> None:
        """Apply every pending noise and remove the hooks: the table is a plain embedding again."""
        self.release()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.reads.clear()
