"""Per-user quantization for secure aggregation: a hard L2 bound per user, an unbiased sum, no overflow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedtower.client.dp_training import DPConfig, DPTrainer
from fedtower.client.local import build_model, cached_dataset
from fedtower.config import RunSettings
from fedtower.data.prepared import prepare_split
from fedtower.privacy.quantization import SIGNED_LIMIT, clip_coordinates, l1_bound, quantize_and_sum, site_range
from fedtower.privacy.secure_random import DPRandom


def test_l1_bound_is_the_smaller_of_the_two_integer_bounds():
    # D2 = 3: a vector of nine ones has L2 3 and L1 9 = D2^2; with 4 coordinates, L1 <= 2 x 3 = 6.
    assert l1_bound(3, 100) == 9.0
    assert l1_bound(3, 4) == 6.0


def test_rounding_keeps_every_user_within_the_bound_whatever_the_uniforms():
    # Prepare: user 0 sits exactly on the bound with fractional coordinates (rounding up would exceed it),
    # user 1 well inside it.
    l2 = 10
    samples = torch.tensor([0, 0, 0, 0, 1, 1])
    coordinates = torch.tensor([0, 1, 2, 3, 0, 4])
    values = torch.tensor([5.5, 5.5, 5.5, 5.5, 1.25, -2.75], dtype=torch.float64)  # user 0: norm 11 -> scale
    values[:4] *= l2 / math.sqrt(4 * 5.5**2)  # norm exactly 10
    for trial in range(200):
        uniforms = torch.from_numpy(np.random.default_rng(trial).uniform(size=6))
        # Execute
        total = quantize_and_sum(samples, coordinates, values, uniforms, batch=2, length=5, l2_bound=l2)
        # Assert: each user's integer vector, recovered from the sum's coordinates they alone touch.
        user0 = torch.floor(values[:4] + uniforms[:4]).long()
        if int((user0 * user0).sum()) > l2**2:
            user0 = torch.trunc(values[:4]).long()
        assert int((user0 * user0).sum()) <= l2**2
        assert total[1:4].tolist() == user0[1:4].tolist()
        assert abs(int(total[4]) - (-2.75)) < 1


def test_stochastic_rounding_is_unbiased_inside_the_bound():
    samples, coordinates = torch.zeros(3, dtype=torch.long), torch.arange(3)
    values = torch.tensor([0.3, -1.6, 2.5], dtype=torch.float64)  # norm ~3.0, bound 100: never shrunk
    rng = np.random.default_rng(0)
    totals = torch.stack([quantize_and_sum(samples, coordinates, values, torch.from_numpy(rng.uniform(size=3)),
                                           batch=1, length=3, l2_bound=100) for _ in range(4000)]).double()  # fmt: skip
    assert torch.allclose(totals.mean(0), values, atol=0.05)


def test_coordinate_clipping_moves_a_sum_by_at_most_one_users_vector():
    # The sensitivity argument: |clip(a + b) - clip(a)| <= |b| per coordinate.
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.integers(-50, 50, size=1000))
    b = torch.from_numpy(rng.integers(-20, 20, size=1000))
    moved = clip_coordinates(a + b, 30) - clip_coordinates(a, 30)
    assert bool((moved.abs() <= b.abs()).all())


def test_site_range_leaves_room_for_every_site_and_its_noise():
    bound = site_range(num_sites=10, noise_std=4096.0)
    assert 10 * (bound + 64 * 4096.0) < SIGNED_LIMIT
    with pytest.raises(ValueError, match="cannot fit"):
        site_range(num_sites=10, noise_std=2.0**30)


def test_integer_user_sum_matches_the_clipped_float_sum_up_to_rounding():
    # Prepare: a small synthetic site, DP trainer on the sparse path; the float reference is the trainer's
    # own pre-noise clipped sum of the same step (inspect), in the same secret randomness.
    settings = RunSettings(data="synthetic:users=60,items=80,seed=3", dim=8, history_len=20)
    dataset = cached_dataset(settings.data)
    split = prepare_split(dataset)
    config = DPConfig(unit="user", noise_multiplier=1.0, max_grad_norm=0.5, sample_rate=0.5, steps=1, lr=0.01,
                      num_negatives=16, history_len=20)  # fmt: skip

    def trainer() -> DPTrainer:
        torch.manual_seed(0)
        model = build_model(settings, dataset.catalogue, len(split.train))
        return DPTrainer(model, config, randomness=DPRandom.test_only_seeded(11))

    reference = trainer()
    seen = {}
    reference.inspect = seen.update
    reference.step(split.train, None)
    l2 = 2**14
    quantized = trainer()
    keys = list(quantized.model.item_tower_state())
    # Execute
    total, batch = quantized.integer_user_sum(split.train, keys=keys, l2_bound=l2)
    # Assert: same parameters and order (the inspected names are the item tower's here), same users sampled.
    assert reference.dp_names == keys
    float_sum = seen["clipped_sum"].double() * (l2 / config.max_grad_norm)
    assert batch == seen["per_sample"].shape[0] > 0
    error = (total.double() - float_sum).abs()
    assert float(error.max()) <= batch  # under one unit per user and coordinate
    assert float((total.double() - float_sum).norm() / float_sum.norm()) < 0.05


def test_no_sum_overflows_at_the_largest_catalogue_benchmarked():
    # Prepare: the item tower of the cost benchmark's largest catalogue (10^5 items, dim 32), 10 sites, each
    # at the worst case: every coordinate of its clipped sum at +-site_range (half of them +, half -), plus
    # its Skellam noise share at a large noise (z = 10, secagg-scale 4096, t = 6), one site dropped out.
    from fedtower.privacy.skellam import skellam_noise
    from fedtower.secure_aggregation.protocol import decode_signed, encode_signed, run_in_memory
    from fedtower.server.federation import initial_item_tower

    tower = initial_item_tower(RunSettings(data="synthetic:users=100,items=100000,seed=0", dim=32))
    length = sum(array.numpy().size for array in tower.values())
    sites, t, z, scale = 10, 6, 10.0, 4096
    mu = (z * scale) ** 2 / (2 * t)
    bound = site_range(num_sites=sites, noise_std=math.sqrt(2 * mu))
    signs = np.where(np.arange(length) % 2 == 0, 1, -1).astype(np.int64)
    shares = {node: bound * signs + skellam_noise(DPRandom(), mu=mu, size=length) for node in range(1, sites + 1)}
    # Execute: the real protocol, modulo 2^32, site 10 gone before masking.
    result = run_in_memory({n: encode_signed(v) for n, v in shares.items()}, threshold=t, drop_after={10: "share_keys"})
    # Assert: the decoded sum is the exact signed sum of the nine inputs, near the 32-bit edge but inside it.
    expected = sum(shares[n] for n in range(1, sites))
    assert length == 3_307_968
    np.testing.assert_array_equal(decode_signed(result.aggregate), expected)
    assert np.abs(expected).max() > 0.85 * SIGNED_LIMIT * (sites - 1) / sites
