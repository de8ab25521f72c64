"""Lazily drawn noise on embedding tables: exact against dense DP-SGD, and never observable unnoised.

The reference is the "opacus" path of the same trainer: Opacus hooks over the
whole model, dense noise on every row at every step, the same SGD on the tables.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from fedtower.central import build_model
from fedtower.client.dp_training import DPConfig, DPTrainer, InteractionSamples
from fedtower.config import RunSettings
from fedtower.data.prepared import prepare_split
from fedtower.data.sources import resolve_dataset
from fedtower.models.training import evaluate
from fedtower.privacy.secure_random import DPRandom
from fedtower.privacy.sparse_tables import (
    LazyNoiseTable,
    clip_factors,
    per_sample_row_grads,
    per_sample_squared_norms,
)


@pytest.fixture(scope="module")
def data():
    dataset, _ = resolve_dataset("synthetic:users=30,items=40,seed=3")
    return dataset, prepare_split(dataset)


def make_trainer(data, unit, *, path, noise, rate=0.3, steps=4, seed=5, noise_seed=None, lr=1e-2):
    dataset, split = data
    torch.manual_seed(0)
    model = build_model(dataset, split, dim=4, content_hidden=8)
    with torch.no_grad():
        model.user_tower.embedding.weight.normal_(0, 0.1)
    config = DPConfig(unit=unit, noise_multiplier=noise, max_grad_norm=0.3, sample_rate=rate, steps=steps,
                      lr=lr, num_negatives=4, positives=2, history_len=10, embedding_path=path,
                      table_lr=0.8)  # fmt: skip
    # Test-only seeds: the same samples and negatives on both paths; only the noise stream varies.
    streams = {"noise": noise_seed} if noise_seed is not None else None
    return model, DPTrainer(model, config, randomness=DPRandom.test_only_seeded(seed, stream_seeds=streams))


def run(trainer, split):
    trainer.run(split.train)
    trainer.detach()


# ----------------------------------------------------------------- pure pieces
def test_per_sample_row_grads_sums_repeated_reads_of_a_row_within_a_sample():
    # Prepare: sample 0 reads rows 1, 1, 3; sample 1 reads rows 2, 1, 1 (d = 1).
    ids = torch.tensor([[1, 1, 3], [2, 1, 1]])
    grads = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]]).unsqueeze(-1)
    # Execute
    samples, rows, row_grads = per_sample_row_grads(ids, grads, num_rows=5)
    # Assert: one entry per distinct (sample, row), by hand.
    got = {(int(s), int(r)): float(g) for s, r, g in zip(samples, rows, row_grads[:, 0])}
    assert got == {(0, 1): 3.0, (0, 3): 4.0, (1, 1): 48.0, (1, 2): 8.0}
    # ...and the per-sample squared norms (Gram form) are those of the summed rows.
    torch.testing.assert_close(per_sample_squared_norms(ids, grads, 5), torch.tensor([9.0 + 16.0, 48.0**2 + 64.0]))


def test_gram_and_per_row_norms_agree_on_random_reads():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (6, 300), generator=generator)  # many repeats, and S above the Gram limit
    grads = torch.randn(6, 300, 3, generator=generator)
    samples, _, row_grads = per_sample_row_grads(ids, grads, 7)
    by_rows = torch.zeros(6).index_add_(0, samples, row_grads.pow(2).sum(1))
    torch.testing.assert_close(per_sample_squared_norms(ids, grads, 7), by_rows)
    torch.testing.assert_close(per_sample_squared_norms(ids[:, :50], grads[:, :50], 7),
                               torch.zeros(6).index_add_(0, *_rows_norms(ids[:, :50], grads[:, :50])))


def _rows_norms(ids, grads):
    samples, _, row_grads = per_sample_row_grads(ids, grads, 7)
    return samples, row_grads.pow(2).sum(1)


def test_clip_factors_match_opacus():
    squared = torch.tensor([0.0, 0.25, 4.0])
    torch.testing.assert_close(clip_factors(squared, 1.0), torch.tensor([1.0, 1.0, 1 / (2 + 1e-6)]))


def test_unread_rows_get_the_summed_variance_of_every_step_they_missed():
    # Prepare: a table of 20,000 rows of zeros; 5 noise-only steps, then rows 0..9,999 are read
    # half-way (they get their noise then) and everything is released at the end.
    table = nn.Embedding(20_000, 1)
    nn.init.zeros_(table.weight)
    lazy = LazyNoiseTable(table, randomness=DPRandom.test_only_seeded(0))
    lr, noise_std, batch = 0.5, 2.0, 4.0
    # Execute
    with torch.no_grad():
        for step in range(5):
            lazy.step(None, None, lr=lr, noise_std=noise_std, batch_divisor=batch)
            if step == 2:
                table(torch.arange(10_000))  # a read in between
        assert lazy.pending_rows() == 20_000  # two more steps since the read
        lazy.release()
    # Assert: Var = steps * (lr * sigma * C / B)^2 for read and unread rows alike.
    expected = 5 * (lr * noise_std / batch) ** 2
    for half in (table.weight[:10_000, 0], table.weight[10_000:, 0]):
        assert abs(float(half.detach().var()) / expected - 1) < 0.05
        assert abs(float(half.detach().mean())) < 4 * math.sqrt(expected / 10_000)
    assert lazy.pending_rows() == 0


# --------------------------------------------------------- exact vs the reference
@pytest.mark.parametrize("unit", ["user", "interaction"])
def test_with_noise_off_sparse_and_dense_reference_release_the_same_parameters(data, unit):
    # Prepare: several steps at q = 0.3, so many rows go unread in some steps. The dense layers'
    # Adam is held still (lr 0): Adam divides a near-zero gradient by its own size, which turns
    # summation-order rounding into visible steps (their clipped sums are compared exactly in
    # test_dp_training.py).
    _, split = data
    dense_model, dense = make_trainer(data, unit, path="opacus", noise=1e-12, lr=0.0)
    sparse_model, sparse = make_trainer(data, unit, path="sparse", noise=1e-12, lr=0.0)
    initial = {k: v.clone() for k, v in dense_model.state_dict().items()}
    # Execute
    run(dense, split)
    run(sparse, split)
    # Assert: every parameter agrees to float tolerance, and the tables did move.
    expected, got = dense_model.state_dict(), sparse_model.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(got["item_tower.id_embedding.weight"], initial["item_tower.id_embedding.weight"])


@pytest.mark.parametrize("unit", ["user", "interaction"])
def test_released_tables_match_the_dense_reference_in_distribution(data, unit):
    # Prepare: the same data, sampling and init; only the noise seed varies, 150 times per path.
    _, split = data
    runs = 150

    def released(path):
        out = []
        for noise_seed in range(runs):
            model, trainer = make_trainer(data, unit, path=path, noise=1.0, noise_seed=10_000 + noise_seed)
            start = model.item_tower.id_embedding.weight.detach().clone()
            run(trainer, split)
            out.append((model.item_tower.id_embedding.weight.detach() - start).flatten())
        return torch.stack(out).double()  # runs x (items * dim)

    # Execute
    dense, sparse = released("opacus"), released("sparse")
    # Assert: per-coordinate means agree within their standard error (z-scores look standard
    # normal), and per-coordinate variances agree (log-ratio near 0, none far off).
    mean_gap = sparse.mean(0) - dense.mean(0)
    stderr = ((sparse.var(0) + dense.var(0)) / runs).sqrt()
    z = mean_gap / stderr
    assert float((z.abs() > 3.5).float().mean()) < 0.01
    assert abs(float(z.mean())) < 4 / math.sqrt(z.numel())
    log_ratio = (sparse.var(0) / dense.var(0)).log()
    ratio_sd = math.sqrt(4 / (runs - 1))  # sd of the log of a ratio of two sample variances
    assert abs(float(log_ratio.mean())) < 4 * ratio_sd / math.sqrt(log_ratio.numel())
    assert float((log_ratio.abs() > 3.5 * ratio_sd).float().mean()) < 0.01
    assert float(log_ratio.abs().max()) < 5 * ratio_sd
    # ...and the noise is the bulk of it: the released std is the dense noise std, lr*sigma*C/B*sqrt(T).
    _, trainer = make_trainer(data, unit, path="sparse", noise=1.0)
    population = len(split.train) if unit == "user" else split.train.items.size
    per_step = 0.8 * 1.0 * 0.3 / max(1.0, 0.3 * population)
    assert float(dense.std(0).median()) == pytest.approx(per_step * math.sqrt(4), rel=0.35)


# --------------------------------------------------------------- no unnoised read
def test_every_read_sees_the_pending_noise(data):
    # Prepare: a few sparse steps at a low rate, so most rows owe noise.
    _, split = data
    model, trainer = make_trainer(data, "interaction", path="sparse", noise=1.0, rate=0.05, steps=3)
    samples = InteractionSamples.from_histories(split.train)
    model.train()
    for _ in range(3):
        trainer.step(split.train, samples)
    item_table = trainer.tables[0]
    assert item_table.pending_rows() > 0
    # Execute / Assert: a forward pass applies the noise of the rows it reads, before reading them.
    read = torch.nonzero(item_table.row_variance < item_table.variance_so_far).flatten()[:2]
    owed_before = (item_table.variance_so_far - item_table.row_variance[read]).clone()
    before = model.item_tower.id_embedding.weight.detach()[read].clone()
    with torch.no_grad():
        vectors, _ = model.item_tower(read)
    assert (owed_before > 0).all()
    assert (item_table.row_variance[read] == item_table.variance_so_far).all()
    assert not torch.equal(vectors, before)  # what the forward saw already had the noise
    # state_dict (release to the server, checkpoints) applies all of it, on every table.
    state = model.item_tower_state()
    assert all(t.pending_rows() == 0 for t in trainer.tables)
    assert torch.equal(state["item_tower.id_embedding.weight"], model.item_tower.id_embedding.weight)
    # Evaluation reads the whole catalogue through the forward: nothing owed afterwards either.
    trainer.step(split.train, samples)
    assert item_table.pending_rows() > 0
    evaluate(model, split.train, split.test, k=5, history_len=10, pool_history=False)
    assert item_table.pending_rows() == 0
    # detach() releases everything and removes the hooks: the model is a plain module again.
    trainer.step(split.train, samples)
    trainer.detach()
    assert all(t.pending_rows() == 0 for t in trainer.tables)
    assert not model.item_tower.id_embedding._forward_hooks
    assert not model.item_tower.id_embedding._forward_pre_hooks


def test_a_sparse_step_writes_only_the_rows_its_batch_read(data):
    # Prepare: two sparse steps at a low rate; record which rows each forward read.
    _, split = data
    model, trainer = make_trainer(data, "interaction", path="sparse", noise=1.0, rate=0.05, steps=2)
    samples = InteractionSamples.from_histories(split.train)
    trainer.step(split.train, samples)  # from here on every row owes noise
    before = model.item_tower.id_embedding.weight.detach().clone()
    read = []
    hook = model.item_tower.id_embedding.register_forward_pre_hook(lambda m, args: read.append(args[0]))
    # Execute
    trainer.step(split.train, samples)
    hook.remove()
    # Assert: rows the batch did not read keep their exact bytes (their noise is owed, not drawn);
    # every row owes this step's noise.
    read_rows = set(torch.cat([r.flatten() for r in read]).tolist())
    moved = set(np.flatnonzero((model.item_tower.id_embedding.weight.detach() - before).abs().sum(1) > 0))
    assert read_rows and moved <= read_rows
    assert len(moved) < model.config.num_items
    assert trainer.tables[0].pending_rows() == model.config.num_items


# ------------------------------------------------------------------ refusals
def test_adam_on_tables_is_refused_on_the_sparse_path_with_a_reason():
    with pytest.raises(ValueError, match="cannot be made exact with lazily drawn noise"):
        RunSettings.from_run_config({"dp-table-optimizer": "adam"})
    with pytest.raises(ValueError, match="momentum"):
        RunSettings.from_run_config({"dp-table-optimizer": "momentum"})
    # The dense Opacus path can run Adam on the tables (dense noise, no laziness).
    settings = RunSettings.from_run_config({"dp-table-optimizer": "adam", "dp-embedding-path": "opacus"})
    assert settings.dp_table_optimizer == "adam"
