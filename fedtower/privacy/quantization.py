"""Integer updates for secure aggregation: per-user quantization with a hard L2 bound, and no overflow.

Secure aggregation sums integers modulo 2^32, so each site turns its users'
clipped float gradients into integers. The privacy analysis of the Skellam
mechanism needs one user's integer contribution bounded in L2 (and so in L1),
whatever the rounding did:

- each sampled user's clipped gradient is scaled so that its L2 norm is at
  most `l2_bound` integer units (`secagg-scale`), then stochastically rounded
  per coordinate (unbiased);
- a user whose rounded vector came out longer than `l2_bound` is rounded
  toward zero instead (never longer than before rounding), shrinking until it
  fits: the bound holds for every user, exactly, in integer arithmetic;
- an integer vector with L2 norm D2 has L1 norm at most min(D2^2, sqrt(d) D2)
  (each non-zero coordinate is at least 1 in absolute value).

Overflow: a site clips each coordinate of its (noiseless) sum to +-`site_range`
before adding its noise. Clipping coordinates is 1-Lipschitz per coordinate,
so one user still moves the clipped sum by at most its own vector (the
sensitivity is unchanged). With n sites, n (range + noise margin) < 2^31, so
the modular sum decodes to the true signed sum unless some site's noise
exceeded its margin of `NOISE_MARGIN_STDS` standard deviations (a Poisson
tail below 1e-300).
"""

from __future__ import annotations

import math

import torch

MODULUS_BITS = 32
SIGNED_LIMIT = 2 ** (MODULUS_BITS - 1)  # the decoded sum lies in [-2^31, 2^31)
NOISE_MARGIN_STDS = 64


def l1_bound(l2_bound: int, length: int) -> float:
    """The largest L1 norm of an integer vector of `length` coordinates with L2 norm <= `l2_bound`."""
    return float(min(l2_bound**2, math.sqrt(length) * l2_bound))


def site_range(*, num_sites: int, noise_std: float) -> int:
    """The bound each site clips its sum's coordinates to, so that no sum of `num_sites` overflows."""
    margin = math.ceil(NOISE_MARGIN_STDS * noise_std) + 1
    bound = SIGNED_LIMIT // num_sites - margin - 1
    if bound < 1:
        raise ValueError(
            f"Secure aggregation of {num_sites} sites with noise std {noise_std:.3g} per site cannot fit in "
            f"{MODULUS_BITS}-bit sums; lower secagg-scale or the noise."
        )
    return bound


def quantize_and_sum(
    samples: torch.Tensor,
    coordinates: torch.Tensor,
    values: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    batch: int,
    length: int,
    l2_bound: int,
) -> torch.Tensor:
    """The sum over users of their integer vectors -> `length` int64.

    samples, coordinates, values, uniforms: K entries, one per (user, coordinate) that user's
    update touches (each pair at most once); values already scaled to integer units with each
    user's L2 norm at most `l2_bound`; uniforms in (0, 1), secret, for the stochastic rounding.
    """
    values = values.double()
    rounded = torch.floor(values + uniforms.double()).long()  # K
    too_long = _norms_squared(samples, rounded, batch) > l2_bound**2  # batch
    shrink = 1.0
    while bool(too_long.any()):
        # Toward zero, never longer than the value itself; shrink a hair more if float error still tips it over.
        redo = too_long[samples]
        rounded[redo] = torch.trunc(values[redo] * shrink).long()
        too_long = _norms_squared(samples, rounded, batch) > l2_bound**2
        shrink *= 1 - 1e-6
    return torch.zeros(length, dtype=torch.long).index_add_(0, coordinates, rounded)


def _norms_squared(samples: torch.Tensor, rounded: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.zeros(batch, dtype=torch.long).index_add_(0, samples, rounded * rounded)


def clip_coordinates(total: torch.Tensor, bound: int) -> torch.Tensor:
    """A site's sum with every coordinate within +-bound (see the module docstring: sensitivity kept)."""
    return total.clamp(-bound, bound)
