"""Compressed item-tower replies end to end: fewer bytes on the wire, the same federation, strict decoding."""

import numpy as np
import pytest

from fedtower.compression import CODECS, decode_tower, encode_tower
from fedtower.config import UPDATE_CODECS, RunSettings
from fedtower.simulations.in_process import simulate_in_process

DATA = "synthetic:users=150,items=400,seed=4"
SITES = {"allow-plaintext-state": True, "allow-raw-evaluation": True}


def run(tmp_path, name, full=False, **overrides):
    settings = RunSettings.from_run_config({
        "data": DATA, "num-sites": 3, "dim": 16, "history-len": 30, "num-negatives": 32, "num-server-rounds": 3,
        "eval-every": 3, "local-epochs": 1, "output-dir": str(tmp_path), "run-name": name, **overrides})  # fmt: skip
    result, grid = simulate_in_process(settings, site_config=SITES)
    final = [row for row in result["history"] if row["phase"] == "evaluate"][-1]
    train = [row for row in result["history"] if row["phase"] == "train"]
    return (final, train, grid, result) if full else (final, train, grid)


def test_the_config_and_the_codec_agree_on_the_choices():
    assert UPDATE_CODECS == CODECS


@pytest.mark.simulation
def test_int8_replies_are_about_4x_smaller_and_the_federation_learns_the_same(tmp_path):
    # Execute: the same run with fp32 replies and with int8 deltas.
    plain, plain_train, plain_grid = run(tmp_path, "fp32", dim=64)
    small, small_train, small_grid = run(tmp_path, "int8", dim=64, **{"update-compression": "int8"})
    # Assert: the wire (Flower's serialized replies) carries ~(d + 4) / 4d of the bytes, and the round
    # metrics say so; quality moves by little (int8 rounding is unbiased).
    ratio = sum(plain_grid.sent_bytes.values()) / sum(small_grid.sent_bytes.values())
    assert ratio > 3.0, ratio
    assert small_train[-1]["sent-bytes-per-site"] / small_train[-1]["received-bytes-per-site"] > 3.5
    assert plain_train[-1]["received-bytes-per-site"] == plain_train[-1]["sent-bytes-per-site"]
    assert abs(small["ndcg@20"] - plain["ndcg@20"]) < 0.25 * plain["ndcg@20"] + 0.01
    replies = [m for m in small_grid.received if not m.has_error() and "arrays" in m.content]
    assert replies, "no training reply was recorded"


@pytest.mark.simulation
def test_a_dp_run_compresses_after_the_noise_and_keeps_its_ledger(tmp_path):
    # Execute
    final, train, grid, result = run(tmp_path, "dp", full=True, **{
        "update-compression": "fp16", "noise-multiplier": 1.0, "dp-batch-size": 16, "privacy-unit": "interaction"})
    # Assert: every round trained and was accounted; replies were half size.
    assert len(train) == 3 and all(row["received-bytes-per-site"] * 1.9 < row["sent-bytes-per-site"] for row in train)
    assert np.isfinite(final["ndcg@20"])
    trained = [e for e in result["ledger"] if e["status"] == "trained" and e["release"] != "evaluation-sums"]
    assert trained and {e["release"] for e in trained} == {"item-tower-delta-fp16"}


def test_a_reply_that_is_not_the_towers_delta_is_refused_naming_the_tensor():
    # Prepare
    base = {"item_tower.id_embedding.weight": np.zeros((5, 4), np.float32),
            "item_tower.bias.weight": np.zeros((5, 1), np.float32)}
    trained = {k: v + 0.5 for k, v in base.items()}
    good = encode_tower(trained, base, codec="int8")
    # Execute / Assert: the good one decodes to the trained tower.
    decoded = decode_tower(good, base, codec="int8")
    assert all(np.allclose(decoded[k], trained[k]) for k in base)
    with pytest.raises(ValueError, match="missing"):
        decode_tower({k: v for k, v in good.items() if not k.endswith("@scales")}, base, codec="int8")
    bad = {**good, "item_tower.bias.weight@values": good["item_tower.bias.weight@values"][:3]}
    with pytest.raises(ValueError, match="'item_tower.bias.weight'.*shape"):
        decode_tower(bad, base, codec="int8")


def test_compression_is_refused_where_replies_are_not_item_towers(tmp_path):
    with pytest.raises(ValueError, match="update-compression"):
        RunSettings.from_run_config({"update-compression": "int8", "dp-mechanism": "spectral",
                                     "num-server-rounds": 3, "target-epsilon": 4.0})  # fmt: skip
    with pytest.raises(ValueError, match="update-compression must be one of"):
        RunSettings.from_run_config({"update-compression": "int4"})
