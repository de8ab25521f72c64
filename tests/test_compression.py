"""Compressed updates: error bounds, unbiased int8 rounding, byte counts, and strict decoding."""

import numpy as np
import pytest

from fedtower.compression import decode, encode, payload_bytes


@pytest.fixture()
def delta():
    return np.random.default_rng(0).normal(scale=0.01, size=(500, 64)).astype(np.float32)


def test_fp32_round_trips_exactly(delta):
    assert np.array_equal(decode(encode(delta, codec="fp32"), codec="fp32", shape=delta.shape), delta)


def test_fp16_is_within_half_an_ulp(delta):
    # Execute
    decoded = decode(encode(delta, codec="fp16"), codec="fp16", shape=delta.shape)
    # Assert: fp16 keeps 11 significant bits: relative error <= 2^-11 (normal range).
    assert np.all(np.abs(decoded - delta) <= np.abs(delta) * 2.0**-11 + 6e-8)


def test_int8_error_is_below_one_step_of_the_rows_scale(delta):
    # Execute
    payload = encode(delta, codec="int8", rng=np.random.default_rng(1))
    decoded = decode(payload, codec="int8", shape=delta.shape)
    # Assert: one step = max |row| / 127; the row's largest entry is exact.
    step = np.abs(delta).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(decoded - delta) <= step * (1 + 1e-5))
    assert np.allclose(np.abs(decoded).max(axis=1), np.abs(delta).max(axis=1), rtol=1e-6)


def test_int8_rounding_is_unbiased():
    # Prepare: 0.3 steps above a level, so deterministic rounding would be 0.3 steps off every time.
    row = np.array([[127.0, 10.3, -5.3]], dtype=np.float32) / 127
    rng = np.random.default_rng(2)
    # Execute
    mean = np.mean([decode(encode(row, codec="int8", rng=rng), codec="int8", shape=row.shape)
                    for _ in range(4000)], axis=0)  # fmt: skip
    # Assert: within 4 standard errors (std of one draw <= 0.5 step).
    assert np.allclose(mean, row, atol=4 * 0.5 / 127 / np.sqrt(4000))


def test_a_zero_row_stays_zero():
    zero = np.zeros((3, 4), dtype=np.float32)
    assert np.array_equal(decode(encode(zero, codec="int8"), codec="int8", shape=zero.shape), zero)


def test_bytes_per_row_are_4d_2d_and_d_plus_4(delta):
    rows, dim = delta.shape
    sizes = {codec: payload_bytes(encode(delta, codec=codec)) for codec in ("fp32", "fp16", "int8")}
    assert sizes == {"fp32": rows * 4 * dim, "fp16": rows * 2 * dim, "int8": rows * (dim + 4)}


def test_a_one_dimensional_bias_is_one_column():
    bias = np.linspace(-1, 1, 7, dtype=np.float32)
    decoded = decode(encode(bias, codec="int8"), codec="int8", shape=bias.shape)
    assert decoded.shape == (7,) and np.allclose(decoded, bias, atol=1 / 127)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda p: {**p, "values": p["values"][:-1]}, "shape"),
        (lambda p: {**p, "values": p["values"].astype(np.int16)}, "int8"),
        (lambda p: {**p, "scales": np.full_like(p["scales"], np.inf)}, "finite"),
        (lambda p: {**p, "scales": -p["scales"]}, "non-negative"),
        (lambda p: {**p, "values": np.full_like(p["values"], -128)}, r"\[-127, 127\]"),
        (lambda p: {"values": p["values"]}, "scales"),
    ],
)
def test_a_bad_int8_payload_is_refused_naming_the_field(delta, tamper, message):
    payload = tamper(encode(delta, codec="int8"))
    with pytest.raises(ValueError, match=message) as error:
        decode(payload, codec="int8", shape=delta.shape, name="item_tower.id_embedding.weight")
    assert "item_tower.id_embedding.weight" in str(error.value)


def test_fp16_refuses_values_it_cannot_hold_and_unknown_codecs_are_named():
    with pytest.raises(ValueError, match="fp16's range"):
        encode(np.array([[1e6]], dtype=np.float32), codec="fp16")
    with pytest.raises(ValueError, match="bf8"):
        encode(np.ones((1, 1), dtype=np.float32), codec="bf8")
    with pytest.raises(ValueError, match="non-finite"):
        encode(np.array([[np.nan]], dtype=np.float32), codec="int8")
