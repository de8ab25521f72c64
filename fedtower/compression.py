"""Compressed item-tower updates: a round's delta in fp16, or int8 with per-row scales.

A site sends `encode(delta)` instead of its fp32 tower; the coordinator checks the
payload as strictly as an fp32 reply (`decode` names the field that is wrong)
and adds the decoded delta to the tower it sent. int8 rounds stochastically
(round up with probability equal to the remainder), so the decoded delta is
unbiased and averaging over sites does not accumulate a rounding drift. Under
DP the delta is encoded after its noise: compression is post-processing and
changes no guarantee.

Bytes per row of width d: fp32 4d, fp16 2d, int8 d + 4 (the scale).
"""

from __future__ import annotations

import numpy as np

CODECS = ("fp32", "fp16", "int8")
INT8_LEVELS = 127  # symmetric: -127..127, so a row's largest magnitude maps exactly to +-127


def encode(delta: np.ndarray, *, codec: str, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """The payload of one 2-D delta (rows x dim; a 1-D array is one column)."""
    rows = _as_rows(delta)
    if codec == "fp32":
        return {"values": rows.astype(np.float32)}
    if codec == "fp16":
        if np.abs(rows).max(initial=0.0) > np.finfo(np.float16).max:
            raise ValueError("The delta has entries beyond fp16's range (65504); use int8 or fp32.")
        return {"values": rows.astype(np.float16)}
    if codec == "int8":
        rng = rng or np.random.default_rng()  # OS entropy: rounding need not be reproducible
        scale = np.abs(rows).max(axis=1, keepdims=True) / INT8_LEVELS
        safe = np.where(scale > 0, scale, 1.0)
        scaled = rows / safe
        low = np.floor(scaled)
        quantized = low + (rng.random(rows.shape) < (scaled - low))
        return {"values": np.clip(quantized, -INT8_LEVELS, INT8_LEVELS).astype(np.int8),
                "scales": scale.astype(np.float32).ravel()}  # fmt: skip
    raise ValueError(f"Unknown update codec {codec!r}; use one of {CODECS}.")


def decode(payload: dict[str, np.ndarray], *, codec: str, shape: tuple[int, ...], name: str = "delta") -> np.ndarray:
    """The fp32 delta of `shape` a payload stands for; a ValueError names `name` and what is wrong."""
    rows_shape = (shape[0], int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1)
    expected_keys = {"values", "scales"} if codec == "int8" else {"values"}
    if codec not in CODECS:
        raise ValueError(f"Unknown update codec {codec!r}; use one of {CODECS}.")
    if set(payload) != expected_keys:
        raise ValueError(f"{name}: a {codec} update holds {sorted(expected_keys)}, got {sorted(payload)}.")
    values = np.asarray(payload["values"])
    dtype = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[codec]
    if values.dtype != dtype or values.shape != rows_shape:
        raise ValueError(f"{name}: values must be {np.dtype(dtype).name} of shape {rows_shape}, "
                         f"got {values.dtype} of shape {values.shape}.")  # fmt: skip
    if codec == "int8":
        scales = np.asarray(payload["scales"])
        if scales.dtype != np.float32 or scales.shape != (rows_shape[0],):
            raise ValueError(f"{name}: scales must be float32 of shape ({rows_shape[0]},), "
                             f"got {scales.dtype} of shape {scales.shape}.")  # fmt: skip
        if not np.all(np.isfinite(scales)) or np.any(scales < 0):
            raise ValueError(f"{name}: every scale must be finite and non-negative.")
        if np.any(values == -128):
            raise ValueError(f"{name}: int8 values must lie in [-127, 127].")
        decoded = values.astype(np.float32) * scales[:, None]
    else:
        decoded = values.astype(np.float32)
        if not np.all(np.isfinite(decoded)):
            raise ValueError(f"{name}: every value must be finite.")
    return decoded.reshape(shape)


def payload_bytes(payload: dict[str, np.ndarray]) -> int:
    return int(sum(np.asarray(array).nbytes for array in payload.values()))


def _as_rows(delta: np.ndarray) -> np.ndarray:
    delta = np.asarray(delta, dtype=np.float32)
    if delta.ndim == 0:
        raise ValueError("A delta must have at least one dimension.")
    if not np.all(np.isfinite(delta)):
        raise ValueError("The delta has non-finite entries; nothing to compress.")
    return delta.reshape(delta.shape[0], -1)


# ------------------------------------------------------------------ item-tower records
VALUES_SUFFIX, SCALES_SUFFIX = "@values", "@scales"


def encode_tower(trained: dict[str, np.ndarray], received: dict[str, np.ndarray], *,
                 codec: str) -> dict[str, np.ndarray]:  # fmt: skip
    """A site's reply arrays: each tensor's delta from the tower it received, encoded with `codec`."""
    encoded: dict[str, np.ndarray] = {}
    for key, value in trained.items():
        delta = np.asarray(value, dtype=np.float32) - np.asarray(received[key], dtype=np.float32)
        payload = encode(delta, codec=codec)
        encoded[key + VALUES_SUFFIX] = payload["values"]
        if "scales" in payload:
            encoded[key + SCALES_SUFFIX] = payload["scales"]
    return encoded


def decode_tower(arrays: dict[str, np.ndarray], base: dict[str, np.ndarray], *, codec: str) -> dict[str, np.ndarray]:
    """The tower a compressed reply stands for: `base` (the tower the coordinator sent) plus each decoded delta.
    Exactly the item tower's tensors, each with its own shape, or a ValueError naming what is wrong."""
    suffixes = (VALUES_SUFFIX, SCALES_SUFFIX) if codec == "int8" else (VALUES_SUFFIX,)
    expected = {key + suffix for key in base for suffix in suffixes}
    if set(arrays) != expected:
        extra, missing = sorted(set(arrays) - expected), sorted(expected - set(arrays))
        raise ValueError(f"a {codec} update's arrays are not the item tower's "
                         f"(unexpected {extra}, missing {missing})")
    tower = {}
    for key, value in base.items():
        payload = {"values": arrays[key + VALUES_SUFFIX]}
        if codec == "int8":
            payload["scales"] = arrays[key + SCALES_SUFFIX]
        delta = decode(payload, codec=codec, shape=tuple(np.shape(value)), name=f"'{key}'")
        tower[key] = np.asarray(value, dtype=np.float32) + delta
    return tower
