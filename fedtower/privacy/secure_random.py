"""The randomness DP relies on: secret, unpredictable, never derived from anything public.

A DP release is private only if nobody can reproduce its noise. Everything a
DP client draws for a mechanism (the Poisson sample of each step, the Gaussian
noise on every parameter and table row, the noise of a DP evaluation or count)
comes from one `DPRandom` per client and round:

- **A cryptographic generator, keyed from the OS.** AES-256 in counter mode,
  with a 256-bit key and 128-bit nonce from `os.urandom`, drawn when the round
  starts, held in memory only, never stored, logged or sent. Seeing any number
  of its outputs (the pure noise on table rows nobody read, for instance)
  tells nothing about the others, which is not true of Mersenne Twister or
  Philox: their state can be solved for from their outputs, and torch seeds
  its CPU generator with 32 bits.
- **Gaussians robust to the floating-point attack** (Mironov 2012; Holohan and
  Braghin 2021): a single Box-Muller draw in floating point reaches only some
  values, and the gaps differ between neighbouring inputs. As Opacus's
  `secure_mode` does, every noise value is the sum of four independent
  Box-Muller draws divided by two (again exactly N(0, 1)), which fills the gaps.

Streams DP does not rely on (the shared negatives, history dropout) may use
fast generators, seeded from `DPRandom.integer_seed()`, so they are secret too.

`DPRandom.test_only_seeded(seed)` derives the key from a seed instead: the same
code path, reproducible, and **not private**. Tests use it; a site can switch it
on only with the node-config key `test-only-insecure-dp-seed`, and every ledger
entry of such a round says so (`randomness`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from fractions import Fraction

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

OS_SOURCE = "os-urandom/aes-256-ctr"
TEST_ONLY_SOURCE = "TEST-ONLY-seeded (not private)"
SECURE_DRAWS = 4  # Gaussian draws summed per noise value (Opacus secure_mode)
_CHUNK = 1 << 18  # noise values per chunk: keeps the Box-Muller temporaries in cache
_POOL = 1 << 16  # noise values drawn ahead for small requests
_TWO_PI = 2.0 * math.pi


class DPRandom:
    """A cryptographically secure source of uniforms, Poisson samples and Gaussian noise."""

    def __init__(self, *, _seed: int | None = None, _stream_seeds: Mapping[str, int] | None = None):
        """A generator keyed from `os.urandom`; the arguments are for `test_only_seeded` only."""
        self._seed, self._stream_seeds = _seed, dict(_stream_seeds or {})
        if _seed is None:
            key, nonce = os.urandom(32), os.urandom(16)
        else:
            digest = hashlib.sha512(f"fedtower-test-only-dp-seed/{_seed}".encode()).digest()
            key, nonce = digest[:32], digest[32:48]
        self._stream = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
        self.source = OS_SOURCE if _seed is None else TEST_ONLY_SOURCE
        self._pool: torch.Tensor | None = None  # noise values drawn ahead (see _from_pool)
        self._pool_at = 0

    @classmethod
    def test_only_seeded(cls, seed: int, *, stream_seeds: Mapping[str, int] | None = None) -> DPRandom:
        """A reproducible generator for tests: anyone who knows `seed` can regenerate its noise.

        `stream_seeds` fixes the seed of named streams (`spawn(name)`), e.g. to vary the noise
        while the Poisson samples stay the same.
        """
        for value in (seed, *(stream_seeds or {}).values()):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"A test-only DP seed must be an integer, got {value!r}.")
        return cls(_seed=seed, _stream_seeds=stream_seeds)

    def spawn(self, name: str) -> DPRandom:
        """An independent generator for one use (Poisson sampling, noise, ...): freshly keyed
        from the OS, or, when test-only seeded, derived from the seed and `name`."""
        if self._seed is None:
            return DPRandom()
        if name in self._stream_seeds:
            return DPRandom(_seed=self._stream_seeds[name])
        derived = int.from_bytes(hashlib.sha256(f"{self._seed}/{name}".encode()).digest()[:8], "big")
        return DPRandom(_seed=derived)

    @property
    def is_secure(self) -> bool:
        return self.source == OS_SOURCE

    # ------------------------------------------------------------ raw bits
    def _bytes(self, count: int) -> bytes:
        return self._stream.update(bytes(count))  # the AES-CTR keystream itself

    def words32(self, count: int) -> np.ndarray:
        return np.frombuffer(self._bytes(4 * count), dtype=np.uint32)

    def words64(self, count: int) -> np.ndarray:
        return np.frombuffer(self._bytes(8 * count), dtype=np.uint64)

    def integer_seed(self) -> int:
        """A secret 63-bit seed for a stream DP does not rely on (negatives, augmentation)."""
        return int(self.words64(1)[0] >> np.uint64(1))

    # ------------------------------------------------------------ uniforms and sampling
    def uniform(self, count: int) -> np.ndarray:
        """`count` float64 uniforms in the open interval (0, 1), 53 random bits each."""
        bits = self.words64(count) >> np.uint64(11)
        return (bits.astype(np.float64) + 0.5) * 2.0**-53

    def poisson_sample(self, count: int, rate: float) -> np.ndarray:
        """Indices of a Poisson sample of range(count): each kept independently with probability `rate`.

        A 64-bit word is below floor(rate * 2^64) with probability at most `rate` and within
        2^-64 of it: exact integer comparisons, never above the rate the accountant charges.
        """
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"A sampling rate must be in [0, 1], got {rate}.")
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        if rate == 1.0:
            return np.arange(count, dtype=np.int64)
        threshold = np.uint64(int(Fraction(rate) * 2**64))
        return np.flatnonzero(self.words64(count) < threshold)

    # ------------------------------------------------------------ Gaussian noise
    def standard_normal(self, shape, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> torch.Tensor:  # fmt: skip
        """N(0, 1) noise of `shape`: each value the sum of four Box-Muller draws, halved."""
        shape = torch.Size(shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,))
        total = shape.numel()
        if total <= _POOL // 4:
            out = self._from_pool(total)
        else:
            out = torch.empty(total, dtype=torch.float32)
            for start in range(0, total, _CHUNK):
                stop = min(start + _CHUNK, total)
                self._secure_normals(stop - start, out=out[start:stop])
        out = out.view(shape)
        if dtype != torch.float32:
            out = out.to(dtype)
        return out if device is None or torch.device(device).type == "cpu" else out.to(device)

    def _from_pool(self, count: int) -> torch.Tensor:
        """`count` values from a block drawn ahead: a DP step asks for a few thousand values at a time, and
        each draw from the cipher has a fixed cost of its own. Every value is handed out once."""
        if self._pool is None or self._pool_at + count > len(self._pool):
            self._pool, self._pool_at = self._secure_normals(_POOL), 0
        out = self._pool[self._pool_at : self._pool_at + count].clone()
        self._pool_at += count
        return out

    def gaussian_like(self, reference: torch.Tensor, std: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Noise shaped and placed like `reference`; `std` a number or a tensor that broadcasts."""
        noise = self.standard_normal(reference.shape, dtype=reference.dtype, device=reference.device)
        return noise.mul_(std)

    def _secure_normals(self, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """`count` N(0, 1) values, float32: (z1 + z2 + z3 + z4) / 2, the z's independent draws.

        One Box-Muller pair (radius, angle) gives two independent normals, r cos and r sin;
        two pairs per value make the four draws.
        """
        words = torch.from_numpy(self.words32(SECURE_DRAWS * count).view(np.int32).copy())
        # 24 random bits -> a float32 uniform in the open interval (0, 1).
        uniforms = words.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF).float().add_(0.5).mul_(2.0**-24)
        uniforms = uniforms.view(SECURE_DRAWS // 2, 2, count)  # [pair][radius, angle][value]
        radius = uniforms[:, 0].log_().mul_(-2.0).sqrt_()  # 2 x count
        angle = uniforms[:, 1].mul_(_TWO_PI)
        draws = angle.cos().add_(angle.sin_()).mul_(radius)  # r cos + r sin, for each pair
        return torch.sum(draws, 0, out=out).mul_(0.5)
