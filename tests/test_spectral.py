"""The spectral DP item tower: its sensitivities attacked by brute force, its accounting, its post-processing,
and the whole mechanism in a federation (the real ServerApp logic and ClientApp handlers, in process)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fedtower.client.spectral_round import (
    HEAD_KEY,
    RELEASE_KEY,
    VECTOR_KEY,
    checked_candidates,
    checked_head,
    histories_from_lists,
    selection_sums,
)
from fedtower.config import RunSettings
from fedtower.models.two_tower import TwoTower, TwoTowerConfig, pad_histories
from fedtower.privacy import spectral
from fedtower.privacy.accounting import ClientAccountant, independent_epsilon
from fedtower.privacy.ledger import LedgerEntry
from fedtower.serving.pooling import unit_blocks as numpy_unit_blocks
from fedtower.simulations.in_process import simulate_in_process

DATA = "synthetic:users=200,items=300,seed=3"
SITES = {"allow-plaintext-state": True}


def histories(lists: list[list[int]]):
    return histories_from_lists([f"u{i}" for i in range(len(lists))], [np.asarray(x, dtype=np.int64) for x in lists])


def spectral_config(tmp_path, name: str, **overrides) -> RunSettings:
    return RunSettings.from_run_config({
        "data": DATA, "num-sites": 3, "dim": 32, "num-server-rounds": 3, "eval-every": 3,
        "dp-mechanism": "spectral", "target-epsilon": 4.0, "output-dir": str(tmp_path), "run-name": name,
        **overrides})  # fmt: skip


# ---------------------------------------------------------------- sensitivities, attacked


def test_one_user_moves_the_user_unit_sums_by_at_most_one():
    # Prepare: users of every size up to 12 items, over a 40-item catalogue and a 25-item head.
    rng = np.random.default_rng(0)
    others = [sorted(rng.choice(40, size=rng.integers(1, 12), replace=False).tolist()) for _ in range(8)]
    head = np.arange(25)
    worst_histogram, worst_cooccurrence = 0.0, 0.0
    for size in range(1, 13):
        user = sorted(rng.choice(40, size=size, replace=False).tolist())
        # Execute: the sums with and without that user.
        with_user, without = histories(others + [user]), histories(others)
        histogram = spectral.user_histogram(with_user, 40, "user") - spectral.user_histogram(without, 40, "user")
        cooccurrence = (spectral.user_cooccurrence(with_user, head, "user")
                        - spectral.user_cooccurrence(without, head, "user"))  # fmt: skip
        worst_histogram = max(worst_histogram, np.linalg.norm(histogram))
        worst_cooccurrence = max(worst_cooccurrence, np.linalg.norm(cooccurrence))
    # Assert: the histogram bound is attained (a user's vector has norm exactly 1), the other holds.
    assert worst_histogram == pytest.approx(1.0)
    assert worst_cooccurrence <= spectral.cooccurrence_sensitivity("user") + 1e-12


def test_one_event_moves_the_interaction_unit_sums_by_at_most_the_stated_bound():
    # Prepare: one user at every head-item count around the floor f = 32 (where the bound is attained).
    floor = spectral.INTERACTION_FLOOR
    head = np.arange(80)
    bound = spectral.cooccurrence_sensitivity("interaction")
    assert bound == pytest.approx(1 / math.sqrt(floor))  # 0.1768 for f = 32
    worst = 0.0
    for size in (0, 1, 5, floor - 2, floor - 1, floor, floor + 1, 60):
        user = list(range(size))
        for added in (size, 79, 200):  # a new head item, the last head item, an item outside the head
            # Execute: add one event (of an item the user does not hold yet, or of one they do).
            before, after = histories([user]), histories([user + [added]])
            change = (spectral.user_cooccurrence(after, head, "interaction")
                      - spectral.user_cooccurrence(before, head, "interaction"))  # fmt: skip
            histogram = (spectral.user_histogram(after, 300, "interaction")
                         - spectral.user_histogram(before, 300, "interaction"))  # fmt: skip
            worst = max(worst, np.linalg.norm(change))
            assert np.linalg.norm(histogram) <= 1.0
        repeat = histories([user + user[:1]]) if size else histories([[]])
        assert np.allclose(spectral.user_cooccurrence(repeat, head, "interaction"),
                           spectral.user_cooccurrence(histories([user]), head, "interaction"))  # fmt: skip
    # Assert: never above the bound, and the bound is tight (n + 1 = f: the new item's f entries of 1 / f).
    assert worst <= bound + 1e-12
    assert worst == pytest.approx(bound, rel=1e-9)


def test_one_users_selection_scores_move_the_sum_by_at_most_sqrt_k():
    # Prepare: a small spectral tower (every weight 1) and five users.
    layout = spectral.SpectralLayout(dim=6, content_dim=2)
    rng = np.random.default_rng(1)
    table = rng.normal(size=(30, 6)).astype(np.float32)
    bias = rng.random((30, 1)).astype(np.float32)
    from flwr.app import Array, ArrayRecord

    arrays = ArrayRecord({"item_tower.id_embedding.weight": Array(table), "item_tower.bias.weight": Array(bias)})
    model = TwoTower(TwoTowerConfig(num_items=30, dim=6, user_blocks=layout.blocks))
    lists = [rng.choice(30, size=n, replace=False).tolist() for n in (2, 5, 8, 1, 12)]
    candidates = list(layout.candidates())
    # Execute
    everyone = selection_sums(model, layout, histories(lists), candidates, arrays, k=5, history_len=50)
    without_last = selection_sums(model, layout, histories(lists[:-1]), candidates, arrays, k=5, history_len=50)
    one = selection_sums(model, layout, histories(lists[-1:]), candidates, arrays, k=5, history_len=50)
    # Assert: sums add up over users, each user's values lie in [0, 1]: L2 <= sqrt(K).
    assert np.allclose(everyone - without_last, one)
    assert np.all((one >= 0) & (one <= 1))
    assert np.linalg.norm(one) <= spectral.selection_sensitivity(len(candidates))


# ---------------------------------------------------------------- accounting


def test_the_three_releases_compose_to_one_gaussian_of_the_planned_multiplier():
    # Prepare: the split of z = 1.2 into the three releases' multipliers.
    multipliers = spectral.noise_multipliers(1.2)
    assert sum(1 / z**2 for z in multipliers.values()) == pytest.approx(1 / 1.2**2)
    one, three = ClientAccountant(), ClientAccountant()
    one.step(noise_multiplier=1.2, sample_rate=1.0, steps=1)
    for z in multipliers.values():
        three.step(noise_multiplier=z, sample_rate=1.0, steps=1)
    # Execute / Assert: RDP of Gaussians adds exactly, so epsilon is the same. Golden value at delta 1e-5:
    # min over Opacus's orders of a / (2 z^2) - (log delta + log a) / (a - 1) + log((a - 1) / a), at a = 6.3.
    assert three.epsilon(delta=1e-5) == pytest.approx(one.epsilon(delta=1e-5), rel=1e-9)
    alpha = 6.3
    golden = alpha / (2 * 1.2**2) - (math.log(1e-5) + math.log(alpha)) / (alpha - 1) + math.log((alpha - 1) / alpha)
    assert golden == pytest.approx(3.8396, abs=1e-4)
    assert one.epsilon(delta=1e-5) == pytest.approx(golden, rel=1e-9)
    assert independent_epsilon(history=three.history, delta=1e-5) == pytest.approx(one.epsilon(delta=1e-5), rel=1e-3)


# ---------------------------------------------------------------- post-processing


def test_the_head_is_what_clears_three_noise_stds_within_its_limits():
    histogram = np.zeros(100)
    histogram[[7, 3, 50]] = [30.0, 12.0, 3.5]  # 3.5 does not clear 3 x 1.2
    histogram[60:90] = 4.0  # 30 items that do
    head = spectral.choose_head(histogram, noise_std=1.2)
    assert head[:2].tolist() == [7, 3]
    assert len(head) == 32 and 50 not in head.tolist()
    assert len(spectral.choose_head(np.zeros(100), noise_std=1.0)) == spectral.HEAD_MIN  # never fewer


def test_the_rank_is_the_eigenvalues_above_the_noise_edge():
    # Prepare: a rank-two signal (eigenvalues 90 and 40) plus symmetric Gaussian noise of std 1 on 100 rows.
    rng = np.random.default_rng(2)
    basis, _ = np.linalg.qr(rng.normal(size=(100, 2)))
    noise = np.triu(rng.normal(size=(100, 100)))
    matrix = basis @ np.diag([90.0, 40.0]) @ basis.T + noise + np.triu(noise, 1).T
    # Execute: the edge is 2 x 1 x sqrt(100) = 20.
    vectors, values = spectral.spectral_vectors(matrix, 1.0, max_rank=10)
    # Assert: two above it, and they span the signal.
    assert vectors.shape == (100, 2)
    assert np.linalg.svd(basis.T @ vectors, compute_uv=False).min() > 0.9
    assert spectral.spectral_vectors(matrix, 1.0, max_rank=1)[0].shape == (100, 1)


def test_a_spectral_score_is_the_weighted_sum_of_its_three_parts():
    # Prepare: a tower with every weight 1, and a user of three items.
    layout = spectral.SpectralLayout(dim=5, content_dim=2)
    rng = np.random.default_rng(3)
    vectors, _ = np.linalg.qr(rng.normal(size=(6, 3)))
    content = spectral.content_block(rng.normal(size=(10, 2)), 10)
    prior = spectral.popularity_prior(rng.normal(size=10))
    head = np.array([9, 0, 4, 2, 7, 1])
    table, bias = spectral.item_tower_arrays(layout, num_items=10, head=head, vectors=vectors, content=content,
                                             prior=prior)  # fmt: skip
    weights = (0.5, 2.0, 0.3)
    weighted_table, weighted_bias = spectral.reweighted(layout, table, bias, weights)
    model = TwoTower(TwoTowerConfig(num_items=10, dim=5, user_blocks=layout.blocks, recency=0.0))
    with torch.no_grad():
        model.item_tower.id_embedding.weight.copy_(torch.from_numpy(weighted_table))
        model.item_tower.bias.weight.copy_(torch.from_numpy(weighted_bias))
    history = [9, 4, 3]  # 3 is outside the head: content only
    # Execute
    scores = model.score_all(None, pad_histories([history], 10))[0].detach().numpy()
    # Assert: by hand, each block of the (uniformly) pooled vector at unit length, times its weight.
    spectral_part = table[history, :3].mean(0)
    content_part = table[history, 3:].mean(0)
    expected = (0.5 * table[:, :3] @ (spectral_part / np.linalg.norm(spectral_part))
                + 2.0 * table[:, 3:] @ (content_part / np.linalg.norm(content_part)) + 0.3 * prior)  # fmt: skip
    assert np.allclose(scores, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(content, axis=1), 1.0)


def test_serving_normalises_the_user_blocks_as_the_model_does():
    vector = np.array([3.0, 4.0, 0.0, 0.0, 2.0], dtype=np.float32)
    model_side = TwoTower(TwoTowerConfig(num_items=2, dim=5, user_blocks=(2, 2, 1)))
    from fedtower.models.two_tower import unit_blocks

    expected = unit_blocks(torch.from_numpy(vector).unsqueeze(0), model_side.config.user_blocks)[0].numpy()
    assert np.allclose(numpy_unit_blocks(vector, (2, 2, 1)), expected)
    assert np.allclose(expected, [0.6, 0.8, 0.0, 0.0, 1.0])


def test_a_site_refuses_a_head_or_candidates_it_cannot_use():
    with pytest.raises(ValueError, match="distinct item rows"):
        checked_head([3, 3, 4], 10)
    with pytest.raises(ValueError, match="distinct item rows"):
        checked_head([0, 10], 10)
    with pytest.raises(ValueError, match="weightings"):
        checked_candidates([1.0, 0.0])
    with pytest.raises(ValueError, match="non-negative"):
        checked_candidates([1.0, -1.0, 0.0])


def test_the_spectral_mechanism_needs_its_three_rounds():
    with pytest.raises(ValueError, match="num-server-rounds = 3"):
        RunSettings.from_run_config({"dp-mechanism": "spectral", "target-epsilon": 4.0, "num-server-rounds": 5})
    with pytest.raises(ValueError, match="dp-mechanism must be one of"):
        RunSettings.from_run_config({"dp-mechanism": "pca"})


# ---------------------------------------------------------------- in a federation


def released(grid, release: str) -> list[tuple[int, np.ndarray]]:
    """(node, vector) of every reply to a `release` request, as the coordinator received it."""
    out = []
    for sent, reply in zip(grid.delivered, grid.received, strict=True):  # the in-process grid answers in order
        asked = "config" in sent.content and sent.content["config"].get(RELEASE_KEY) == release
        if asked and not reply.has_error():
            out.append((sent.metadata.dst_node_id, reply.content["arrays"][VECTOR_KEY].numpy()))
    return out


@pytest.mark.parametrize("unit", ["user", "interaction"])
def test_a_spectral_run_charges_three_gaussian_releases_within_the_target(tmp_path, unit):
    settings = spectral_config(tmp_path, f"spectral-{unit}", **{"privacy-unit": unit})
    result, _ = simulate_in_process(settings, site_config={**SITES, "allow-raw-evaluation": True})
    trained = [LedgerEntry.from_dict(e) for e in result["ledger"] if e["status"] == "trained"]
    assert len(trained) == 3 * 3
    for entry in trained:
        assert entry.mechanism == "gaussian" and entry.released == "item-statistics"
        assert entry.charged[-1][1:] == [1.0, 1] or tuple(entry.charged[-1][1:]) == (1.0, 1)
        assert entry.epsilon_after <= 4.0 * (1 + 1e-6)
        assert independent_epsilon(history=entry.history, delta=entry.delta) == pytest.approx(entry.epsilon_after,
                                                                                               rel=1e-3)  # fmt: skip
    final = [e for e in trained if e.round == 3]
    assert all(e.epsilon_after == pytest.approx(4.0, rel=0.01) for e in final)  # the whole budget, not more
    evaluation = [row for row in result["history"] if row["phase"] == "evaluate"][-1]
    popularity = result["references"]["popularity"]["ndcg@20"]
    assert evaluation["ndcg@20"] > popularity  # the product's promise on this data


def test_the_coordinator_cannot_reproduce_a_sites_noise_and_every_item_is_noised(tmp_path):
    # Prepare: the same run config and seed twice: the coordinator knows both.
    first, second = spectral_config(tmp_path, "first"), spectral_config(tmp_path, "second")
    _, grid_one = simulate_in_process(first, site_config=SITES)
    _, grid_two = simulate_in_process(second, site_config=SITES)
    one, two = dict(released(grid_one, "histogram")), dict(released(grid_two, "histogram"))
    # Assert: the same data gives different releases (the noise is the site's secret) ...
    node = sorted(one)[0]
    assert not np.allclose(one[node], two[node])
    # ... and the difference is noise of the stated std on every item, touched or not (dense release).
    z = None
    for reply in grid_one.received:
        if "metrics" in reply.content and "spectral-noise-std" in reply.content["metrics"]:
            z = reply.content["metrics"]["spectral-noise-std"]
            break
    difference = one[node] - two[node]
    assert np.all(difference != 0)
    assert np.std(difference) == pytest.approx(math.sqrt(2) * z, rel=0.15)


def test_the_coordinator_sends_the_head_it_chose_from_the_noisy_sum(tmp_path):
    settings = spectral_config(tmp_path, "head")
    _, grid = simulate_in_process(settings, site_config=SITES)
    total = sum(vector for _, vector in released(grid, "histogram"))
    heads = [m.content["config"][HEAD_KEY] for m in grid.delivered
             if "config" in m.content and m.content["config"].get(RELEASE_KEY) == "cooccurrence"]  # fmt: skip
    stds = [r.content["metrics"]["spectral-noise-std"] for r in grid.received
            if "metrics" in r.content and "spectral-noise-std" in r.content["metrics"]][:3]  # fmt: skip
    expected = spectral.choose_head(total, math.sqrt(sum(s * s for s in stds)))
    assert all(list(head) == expected.tolist() for head in heads)
    cooccurrence = released(grid, "cooccurrence")
    assert all(v.shape == (spectral.upper_size(len(expected)),) for _, v in cooccurrence)


def test_a_site_stops_releasing_at_its_own_cap(tmp_path):
    # Prepare: one site caps epsilon at 3 in its node config; the run asks for 4.
    settings = spectral_config(tmp_path, "capped")
    result, _ = simulate_in_process(settings, site_config=SITES, per_site={0: {"max-epsilon": 3.0}})
    by_node: dict[str, list[LedgerEntry]] = {}
    for e in result["ledger"]:
        if e["status"] in ("trained", "budget-exhausted"):
            by_node.setdefault(e["node"], []).append(LedgerEntry.from_dict(e))
    capped = [entries for entries in by_node.values() if any(e.status == "budget-exhausted" for e in entries)]
    # Assert: that site released what fits (the histogram, a quarter of the RDP budget) and refused the rest;
    # the others released all three.
    assert len(capped) == 1
    assert [e.status for e in capped[0]][0] == "trained"
    assert max(e.epsilon_after for e in capped[0]) <= 3.0
    assert sorted(len(v) for v in by_node.values() if v is not capped[0]) == [3, 3]


def test_every_candidate_weighting_is_one_of_the_public_grid(tmp_path):
    layout = spectral.SpectralLayout(dim=32, content_dim=0)
    assert layout.blocks == (32,)
    assert all(len(c) == 3 for c in layout.candidates())
    assert spectral.SpectralLayout(dim=32, content_dim=4).blocks == (28, 4)
    with pytest.raises(ValueError, match="raise dim"):
        spectral.SpectralLayout(dim=4, content_dim=4)
    assert list(itertools.chain(*layout.candidates()))  # non-empty grid


# ---------------------------------------------------------------- under secure aggregation


def test_under_secure_aggregation_the_coordinator_unmasks_exactly_the_sum_of_the_sites_shares(tmp_path, monkeypatch):
    # Prepare: record what each site put under its masks (the masking still runs) and each unmasked sum.
    from fedtower.secure_aggregation import protocol
    from fedtower.strategies.spectral import SecureSpectralTower

    inputs, totals = [], []
    masked_input, apply_sum = protocol.SecAggSite.masked_input, SecureSpectralTower.apply_sum

    def record_input(self, vector, *args, **kwargs):
        inputs.append(np.array(vector, copy=True))
        return masked_input(self, vector, *args, **kwargs)

    def record_total(self, server_round, arrays, total, survivors):
        totals.append(np.array(total, copy=True))
        return apply_sum(self, server_round, arrays, total, survivors)

    monkeypatch.setattr(protocol.SecAggSite, "masked_input", record_input)
    monkeypatch.setattr(SecureSpectralTower, "apply_sum", record_total)
    settings = spectral_config(tmp_path, "secure", **{"secure-aggregation": True, "dp-federation-users": 200,
                                                      "secagg-scale": 1024})  # fmt: skip
    # Execute
    result, grid = simulate_in_process(settings, site_config={**SITES, "allow-raw-evaluation": True})
    # Assert: three releases, each unmasked sum is exactly the sum of the three sites' (signed) inputs.
    assert len(totals) == 3 and len(inputs) == 9
    decoded = [protocol.decode_signed(np.asarray(v, dtype=np.int64).astype(np.uint32)) for v in inputs]
    for index, total in enumerate(totals):
        assert np.array_equal(total, sum(decoded[3 * index : 3 * index + 3]))
    # Nothing but masked vectors reached the coordinator in the masked-input stage.
    assert all(VECTOR_KEY not in (r.content.get("arrays") or {}) for r in grid.received if not r.has_error())
    trained = [LedgerEntry.from_dict(e) for e in result["ledger"] if e["status"] == "trained"]
    assert len(trained) == 9
    assert all(e.mechanism == "skellam" and e.trust and e.charged[-1][0] == "skellam" for e in trained)
    assert max(e.epsilon_after for e in trained) <= 4.0 * (1 + 1e-6)
    evaluation = [row for row in result["history"] if row["phase"] == "evaluate"][-1]
    assert evaluation["ndcg@20"] > result["references"]["popularity"]["ndcg@20"]


def test_one_users_quantized_release_stays_within_its_integer_bound():
    # Prepare: users of many sizes; the quantized histogram and co-occurrence releases at 256 units.
    import torch as _torch

    from fedtower.privacy.quantization import quantize_and_sum

    rng = np.random.default_rng(5)
    lists = [rng.choice(50, size=n, replace=False).tolist() for n in (1, 2, 3, 7, 20, 49)]
    head = np.arange(0, 50, 2)
    for release in ("histogram", "cooccurrence"):
        users, coords, values = spectral.per_user_entries(release, histories(lists), unit="user", head=head)
        length = 50 if release == "histogram" else spectral.upper_size(len(head))
        for u in range(len(lists)):
            mine = users == u
            scaled = _torch.from_numpy(values[mine] * 256 / spectral.sensitivity(release, "user"))
            one = quantize_and_sum(_torch.zeros(int(mine.sum()), dtype=_torch.long), _torch.from_numpy(coords[mine]),
                                   scaled, _torch.rand(int(mine.sum()), dtype=_torch.float64), batch=1,
                                   length=length, l2_bound=256)  # fmt: skip
            # Assert: the hard bound holds for every user, whatever the rounding did.
            assert float(one.double().norm()) <= 256
