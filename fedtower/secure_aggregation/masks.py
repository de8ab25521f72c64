"""Mask expansion for secure aggregation: a 32-byte seed to a stream of uint32 words, with AES-256-CTR.

Flower's SecAgg+ expands its agreed 32-byte seeds with
`flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen`, which
XOR-folds the seed's eight 4-byte words into one 32-bit seed for
`numpy.random.RandomState` (MT19937). Whoever sees a masked vector can then
try all 2^32 seeds and recognise the right one (the unmasked vector looks
like a model update, not like noise), and two different seeds whose words
XOR to the same value give the same mask. Here the whole seed keys the PRG:

    key       = HKDF-SHA256(ikm = seed, salt = none, info = label, 32 bytes)
    keystream = AES-256-CTR(key, counter block 0).encrypt(0x00 * 4 * length)
    mask      = keystream read as little-endian uint32 words

Each (seed, label) pair gives a distinct AES key, so the fixed all-zero
initial counter block never repeats under one key; the label separates the
self masks from the pairwise masks. A prefix of a longer mask is the
shorter mask (CTR mode), so masks do not depend on how a vector is chunked.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32
SELF_MASK_LABEL = b"fedtower/secagg/v1/self-mask"
PAIRWISE_MASK_LABEL = b"fedtower/secagg/v1/pairwise-mask"
_ZERO_COUNTER = bytes(16)
_AES_BLOCK = 16


def mask_key(seed: bytes, label: bytes = SELF_MASK_LABEL) -> bytes:
    """The AES-256 key of a seed's mask: HKDF-SHA256 of the seed under the domain-separation label."""
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        raise ValueError(f"A mask seed must be {SEED_BYTES} bytes, got {_describe(seed)}.")
    if not isinstance(label, bytes) or not label:
        raise ValueError("A mask label must be non-empty bytes.")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(bytes(seed))


def expand_mask(seed: bytes, length: int, label: bytes = SELF_MASK_LABEL) -> np.ndarray:
    """`length` pseudo-random uint32 words from a 32-byte seed (AES-256-CTR keystream, little-endian)."""
    if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 0:
        raise ValueError(f"A mask length must be a non-negative integer, got {length!r}.")
    length = int(length)
    key = mask_key(seed, label)
    nbytes = 4 * length
    if nbytes == 0:
        return np.zeros(0, dtype=np.uint32)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()
    # update_into writes the keystream (AES of the counter blocks XOR zeros) without an extra copy;
    # cryptography asks for block_size - 1 spare bytes in the output buffer.
    out = bytearray(nbytes + _AES_BLOCK - 1)
    written = encryptor.update_into(bytes(nbytes), out)
    encryptor.finalize()
    if written != nbytes:  # pragma: no cover - CTR is a stream mode
        raise RuntimeError(f"AES-CTR produced {written} bytes instead of {nbytes}.")
    return np.frombuffer(out, dtype="<u4", count=length).astype(np.uint32, copy=False)


def _describe(value) -> str:
    if isinstance(value, bytes | bytearray):
        return f"{len(value)} bytes"
    return type(value).__name__


if __name__ == "__main__":  # a timing sanity check, not a test: python -m fedtower.secure_aggregation.masks
    import os
    import time

    words = 3_200_000
    seed = os.urandom(SEED_BYTES)
    expand_mask(seed, 1024)
    started = time.perf_counter()
    mask = expand_mask(seed, words)
    took = time.perf_counter() - started
    print(f"expand_mask: {words:,} uint32 words in {took * 1000:.1f} ms ({4 * words / took / 1e9:.2f} GB/s)")
