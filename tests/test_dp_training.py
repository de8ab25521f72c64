"""DP-SGD on the client: clipping, sensitivity per privacy unit, noise on every row, for both paths.

These tests would catch a wrong implementation: they look at the per-sample
gradients Opacus clips, the pre-noise sum it releases, and every row of the
released table.
"""

import numpy as np
import pytest
import torch

from fedtower.central import build_model
from fedtower.client.dp_training import DPConfig, DPTrainer, InteractionSamples, num_dp_samples
from fedtower.data.prepared import UserHistories, prepare_split
from fedtower.data.sources import resolve_dataset
from fedtower.privacy.secure_random import DPRandom

CLIP = 0.5


@pytest.fixture(scope="module")
def data():
    dataset, _ = resolve_dataset("synthetic:users=40,items=60,seed=1")
    return dataset, prepare_split(dataset)


PATHS = ["sparse", "opacus"]


def make_trainer(data, unit, *, noise=1e-9, rate=1.0, steps=1, path="sparse", clip=CLIP, seed=7):
    dataset, split = data
    torch.manual_seed(0)
    model = build_model(dataset, split, dim=8, content_hidden=16)
    with torch.no_grad():  # live user vectors, so their gradients matter
        model.user_tower.embedding.weight.normal_(0, 0.1)
    config = DPConfig(unit=unit, noise_multiplier=noise, max_grad_norm=clip, sample_rate=rate, steps=steps,
                      lr=1e-2, num_negatives=5, positives=3, history_len=20, embedding_path=path,
                      table_lr=0.5)  # fmt: skip
    # Seeded (test-only) so that two trainers draw the same samples and negatives.
    return model, DPTrainer(model, config, randomness=DPRandom.test_only_seeded(seed))


def capture_step(trainer, histories, samples=None):
    """Run one step and capture the per-sample gradients and the pre-noise clipped sum."""
    seen = {}
    trainer.inspect = seen.update
    if samples is None and trainer.config.unit == "interaction":
        samples = InteractionSamples.from_histories(histories)
    trainer.step(histories, samples)
    return seen


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("unit", ["user", "interaction"])
def test_every_clipped_per_sample_gradient_is_within_the_bound(data, unit, path):
    # Prepare
    _, split = data
    clip = 0.05  # below most per-sample norms
    model, trainer = make_trainer(data, unit, path=path, clip=clip)
    # Execute
    seen = capture_step(trainer, split.train)
    # Assert: clip each per-sample gradient as Opacus does; every norm <= clip, most were clipped,
    # and the released pre-noise sum is exactly the sum of the clipped gradients.
    grads = seen["per_sample"]
    norms = grads.norm(dim=1)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    clipped = grads * factors[:, None]
    assert (clipped.norm(dim=1) <= clip + 1e-6).all()
    assert (norms > clip).float().mean() > 0.5  # the bound is active, not vacuous
    torch.testing.assert_close(seen["clipped_sum"], clipped.sum(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("unit", ["user", "interaction"])
def test_touched_row_norms_equal_the_full_per_sample_gradients_of_opacus_hooks(data, unit):
    # Prepare: the same step, once with Opacus hooks over the whole model, once with touched rows.
    _, split = data
    _, dense = make_trainer(data, unit, path="opacus", rate=0.5)
    _, sparse = make_trainer(data, unit, path="sparse", rate=0.5)
    # Execute
    reference = capture_step(dense, split.train)
    ours = capture_step(sparse, split.train)
    # Assert: identical per-sample gradients (so identical norms and clip factors) and sums.
    assert dense.dp_names == sparse.dp_names
    torch.testing.assert_close(ours["per_sample"], reference["per_sample"], rtol=1e-5, atol=1e-6)
    # The norms the sparse path clipped with (from touched rows alone) are the full gradients' norms.
    torch.testing.assert_close(ours["squared_norms"], reference["per_sample"].pow(2).sum(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours["clipped_sum"], reference["clipped_sum"], rtol=1e-5, atol=1e-6)


def without_user(histories: UserHistories, drop: int) -> UserHistories:
    keep = [u for u in range(len(histories)) if u != drop]
    lengths = histories.lengths()[keep]
    items = np.concatenate([histories.items_of(u) for u in keep])
    weights = np.concatenate([histories.weights_of(u) for u in keep])
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    return UserHistories([histories.users[u] for u in keep], indptr, items, weights)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("clip", [CLIP, 1e6])  # clipping active, and (huge bound) inactive
def test_removing_one_user_moves_the_pre_noise_sum_by_exactly_their_clipped_gradient(data, path, clip):
    # Prepare: the same step on D and on D without user 5 (q = 1, so both batches are "everyone").
    _, split = data
    _, with_all = make_trainer(data, "user", path=path, clip=clip)
    _, without = make_trainer(data, "user", path=path, clip=clip)
    # Execute
    seen = capture_step(with_all, split.train)
    full = seen["clipped_sum"]
    # Removing a user shifts later rows; keep row ids stable by zeroing that user's history instead.
    emptied = UserHistories(split.train.users, split.train.indptr.copy(), split.train.items, split.train.weights)
    start, end = split.train.indptr[5], split.train.indptr[6]
    emptied.indptr[6:] -= end - start
    emptied.items = np.delete(split.train.items, np.arange(start, end))
    emptied.weights = np.delete(split.train.weights, np.arange(start, end))
    less = capture_step(without, emptied)["clipped_sum"]
    # Assert: the difference is user 5's own clipped gradient, whatever the batch size
    # (a batch-size-dependent loss scaling would move every other user's term too).
    own = seen["per_sample"][5]
    own = own * min(1.0, clip / (float(own.norm()) + 1e-6))
    torch.testing.assert_close(full - less, own, rtol=1e-4, atol=1e-5)
    assert 0 < (full - less).norm() <= clip + 1e-5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("clip", [CLIP, 1e6])
def test_removing_one_event_moves_the_pre_noise_sum_by_exactly_its_clipped_gradient(data, path, clip):
    # Prepare: D and D without the last event of user 3 (interaction unit, q = 1).
    _, split = data
    _, with_all = make_trainer(data, "interaction", path=path, clip=clip)
    _, without = make_trainer(data, "interaction", path=path, clip=clip)
    seen = capture_step(with_all, split.train)
    full = seen["clipped_sum"]
    # Execute: the neighbouring dataset keeps every other event at the same sample index.
    drop = int(split.train.indptr[4]) - 1
    samples = InteractionSamples.from_histories(split.train)
    reduced = InteractionSamples(np.delete(samples.users, drop), np.delete(samples.items, drop),
                                 np.delete(samples.weights, drop))  # fmt: skip
    without._sample_generator = _shifted(without, drop)  # same per-sample randomness for kept events
    less = capture_step(without, split.train, reduced)["clipped_sum"]
    # Assert
    own = seen["per_sample"][drop]
    own = own * min(1.0, clip / (float(own.norm()) + 1e-6))
    torch.testing.assert_close(full - less, own, rtol=1e-4, atol=1e-5)
    assert 0 < (full - less).norm() <= clip + 1e-5


def _shifted(trainer, dropped):
    original = trainer._sample_generator

    def generator(sample_id):
        return original(sample_id + 1 if sample_id >= dropped else sample_id)

    return generator


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("unit", ["user", "interaction"])
def test_released_item_table_is_noised_on_every_row(data, unit, path):
    # Prepare: a sampling rate so low that most steps see few items; real noise.
    _, split = data
    model, trainer = make_trainer(data, unit, noise=1.0, rate=0.05, steps=3, path=path)
    before = model.item_tower.id_embedding.weight.detach().clone()
    # Execute
    trainer.run(split.train)
    trainer.detach()
    # Assert: every row moved (dense noise), including rows no sample touched.
    moved = (model.item_tower.id_embedding.weight.detach() - before).abs().sum(1)
    assert (moved > 0).all()


def test_user_unit_updates_a_user_embedding_only_from_that_users_own_data(data):
    # Prepare: one step in which only some users are sampled.
    _, split = data
    model, trainer = make_trainer(data, "user", rate=0.3, noise=1.0)
    before = model.user_tower.embedding.weight.detach().clone()
    sampled = []
    original = trainer._user_loss

    def spy(histories, rows):
        sampled.extend(rows.tolist())
        return original(histories, rows)

    trainer._user_loss = spy
    # Execute
    trainer.step(split.train, None)
    # Assert: exactly the sampled users' rows changed (no noise on user embeddings in this unit).
    changed = set(np.flatnonzero((model.user_tower.embedding.weight.detach() - before).abs().sum(1) > 0))
    assert sampled and changed == set(sampled)


@pytest.mark.parametrize("path", PATHS)
def test_empty_poisson_batch_still_takes_a_noise_step(data, path):
    _, split = data
    model, trainer = make_trainer(data, "user", noise=1.0, rate=1e-9, path=path)
    before = model.item_tower.id_embedding.weight.detach().clone()
    assert trainer.step(split.train, None) == 0
    trainer.release()  # the sparse path owes the noise until a row is read
    assert (model.item_tower.id_embedding.weight.detach() != before).all()


def test_dp_samples_per_unit(data):
    _, split = data
    assert num_dp_samples("user", split.train) == int((split.train.lengths() > 0).sum())
    assert num_dp_samples("interaction", split.train) == split.train.items.size


@pytest.mark.parametrize(
    ("change", "message"),
    [({"unit": "event"}, "privacy-unit"), ({"noise_multiplier": 0.0}, "noise multiplier"),
     ({"max_grad_norm": 0.0}, "max-grad-norm"), ({"sample_rate": 0.0}, "sampling rate"),
     ({"table_optimizer": "adam"}, "cannot be made exact with lazily drawn noise"),
     ({"embedding_path": "dense"}, "dp-embedding-path"), ({"table_lr": 0.0}, "dp-table-lr")],
)  # fmt: skip
def test_bad_dp_config_is_refused(change, message):
    base = dict(unit="user", noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=1, lr=0.1)
    with pytest.raises(ValueError, match=message):
        DPConfig(**{**base, **change})
