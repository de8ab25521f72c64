"""The distributed Skellam mechanism: its Rényi DP, Poisson-subsampled, and a secure sampler for its noise.

**The mechanism.** Under secure aggregation each of n sites quantises its
users' clipped updates to integers, adds a share of integer noise, and masks
the result; the coordinator learns only the modular sum over at least t sites.
Each share is symmetric Skellam noise Sk(mu/t, mu/t): the difference of two
independent Poisson(mu/t) variables per coordinate. Independent Poisson
variables add up to a Poisson variable (Poisson(a) + Poisson(b) = Poisson(a+b)
exactly), so t independent shares add up to exactly Sk(mu, mu): a Skellam
mechanism with per-coordinate variance 2 mu, whatever the split. That is why
the shares add up, and why the sum can be accounted for exactly (more than t
sites only add more independent noise, which is post-processing). Each round's
users are Poisson-sampled at rate q, so one round is a Poisson-subsampled
Skellam mechanism.

**Parametrisation.** An entry of the accountant's history is
["skellam", z, q, steps, D2, D1]: the total noise per coordinate is Sk(mu, mu)
with variance 2 mu = (z D2)^2, where D2 and D1 bound the L2 and L1 norms of one
privacy unit's integer contribution to the sum (after scaling and rounding,
in integer units). z plays the role of the Gaussian noise multiplier.

**The bounds.**

- `skellam_rdp`: Agarwal, Kairouz and Liu 2021, "The Skellam Mechanism for
  Differentially Private Federated Learning" (NeurIPS 2021), Theorem 3.5 (the
  multi-dimensional Skellam mechanism): for integer alpha > 1,

      eps(alpha) <= alpha D2^2 / (4 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (16 mu^2), 3 D1 / (4 mu)).

  The paper writes it with the variance (here 2 mu); this is the same bound,
  and google-research/federated's distributed_dp/accounting_utils.py
  (`_skellam_rdp`) implements it in the variance form. The first term is the
  Gaussian mechanism's alpha / (2 z^2); the min is the price of integers.
- `poisson_subsampled_rdp`: Zhu and Wang 2019, "Poisson Subsampled Rényi
  Differential Privacy" (ICML 2019), the general upper bound (Theorem 6 there;
  the distributed_dp code calls it Theorem 5, after the arXiv numbering): for
  any mechanism with RDP eps(.) and integer alpha >= 2,

      eps'(alpha) <= 1/(alpha-1) log( (1-q)^(alpha-1) (alpha q - q + 1) + C(alpha,2) q^2 (1-q)^(alpha-2) e^eps(2)
                                     + 3 sum_{l=3..alpha} C(alpha,l) (1-q)^(alpha-l) q^l e^((l-1) eps(l)) ),

  under add-or-remove-one adjacency, in both directions. The accountant takes
  the smaller of it and eps(alpha) (subsampling never hurts).
- Composition adds RDP order by order; `skellam_epsilon` converts the total
  at integer orders 2..256 with `accounting.epsilon_from_rdp` (Balle et al.
  2020, Theorem 21). Gaussian entries of the same history are charged with
  `accounting.rdp_of_sampled_gaussian` at the same orders.

Google's dp-accounting has no Skellam event, so for these entries there is no
second implementation to compare with; tests/test_skellam.py checks both bounds
against exact Rényi divergences computed over the integers in one dimension.

**The sampler.** `skellam_noise` draws Poisson(mu) - Poisson(mu) from
`DPRandom.uniform` alone (AES-CTR keyed by the OS, never a seeded or global
generator): inversion of the Poisson CDF for mu < 10, and for mu >= 10
Hörmann's PTRS transformed rejection ("The transformed rejection method for
generating Poisson random variables", Insurance: Mathematics and Economics 12,
1993; the algorithm numpy uses), vectorised, with the log pmf in its stable
Stirling form so the acceptance test stays accurate for large mu. Both are
exact in distribution up to double-precision rounding (about 1e-16 in a
probability). The noise is an integer, so the floating-point attack on Gaussian
noise (which reads the low bits of a float) does not apply to it.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from fedtower.privacy.accounting import (
    SKELLAM,
    check_delta,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
    checked_history,
    epsilon_from_rdp,
    is_skellam_entry,
    skellam_entry,
)
from fedtower.privacy.secure_random import DPRandom

# Integer RDP orders: the Skellam bound (and the subsampling bound) hold at integer orders only.
SKELLAM_ORDERS: tuple[int, ...] = tuple(range(2, 257))

PTRS_THRESHOLD = 10.0  # numpy's switch from inversion to PTRS
MAX_MU = 2.0**48  # beyond this k no longer fits float64 exactly enough for the floor in PTRS
_CHUNK = 1 << 20  # candidates per vectorised PTRS pass
_STIRLING_FROM = 16  # log k! by Stirling's series from here on, from a table below
_LOG_FACTORIAL = np.array([math.lgamma(k + 1.0) for k in range(_STIRLING_FROM)])
_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


# ---------------------------------------------------------------- the bounds


def _check_order(order: object, *, minimum: int = 2) -> int:
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order < minimum:
        raise ValueError(f"order must be an integer of at least {minimum} (the bound holds at integer orders); "
                         f"got {order!r}.")  # fmt: skip
    return int(order)


def _check_positive(value: object, name: str) -> float:
    return check_noise_multiplier(value, name=name)  # a positive finite number


def skellam_rdp(*, order: int, noise_multiplier: float, l2_sensitivity: float, l1_sensitivity: float) -> float:
    """RDP at integer `order` of the Skellam mechanism with noise Sk(mu, mu), 2 mu = (z D2)^2, per coordinate.

    Agarwal, Kairouz and Liu 2021, Theorem 3.5:
    alpha D2^2 / (4 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (16 mu^2), 3 D1 / (4 mu)).
    """
    alpha = _check_order(order)
    z = _check_positive(noise_multiplier, "noise_multiplier")
    l2 = _check_positive(l2_sensitivity, "l2_sensitivity")
    l1 = _check_positive(l1_sensitivity, "l1_sensitivity")
    return _skellam_rdp(alpha, z, l2, l1)


def _skellam_rdp(alpha: int, z: float, l2: float, l1: float) -> float:
    mu = (z * l2) ** 2 / 2.0
    integer_price = min(((2 * alpha - 1) * l2**2 + 6.0 * l1) / (16.0 * mu**2), 3.0 * l1 / (4.0 * mu))
    return alpha * l2**2 / (4.0 * mu) + integer_price


def poisson_subsampled_rdp(*, order: int, sample_rate: float, base_rdp: Callable[[int], float]) -> float:
    """Zhu and Wang 2019's general upper bound on the RDP at integer `order` of a Poisson-subsampled mechanism.

    `base_rdp(l)` is the mechanism's RDP at integer order l (called for l = 2..order). Computed in log
    space, so large orders do not overflow. At sample_rate 1 there is no amplification: base_rdp(order).
    """
    alpha = _check_order(order)
    q = check_sample_rate(sample_rate)
    if q == 1.0:
        return float(base_rdp(alpha))
    base = np.array([0.0, 0.0, *(float(base_rdp(order)) for order in range(2, alpha + 1))])
    return float(_subsampled_rdp(q, base, (alpha,))[0])


@functools.lru_cache(maxsize=8)
def _log_factorials(top: int) -> np.ndarray:
    return np.array([math.lgamma(n + 1.0) for n in range(top + 1)])


def _subsampled_rdp(q: float, base: np.ndarray, orders: Sequence[int]) -> np.ndarray:
    """The bound at every order at once; base[l] is eps(l) for l = 2..max(orders) (base[0], base[1] unused).

    The binomial weights w_l = C(alpha, l) q^l (1-q)^(alpha-l) sum to 1 and the bound's first term is
    w_0 + w_1, so the sum inside the log is 1 + S with S = w_2 (e^eps(2) - 1) + sum_{l>=3} w_l (3 e^((l-1) eps(l)) - 1),
    every term >= 0. Computing log(1 + S) from log S keeps full precision when S is tiny (small q),
    where log of the sum itself would lose it to cancellation.
    """
    top = max(orders)
    alphas = np.asarray(orders, dtype=np.int64)[:, None]  # orders x 1
    ls = np.arange(top + 1)[None, :]  # 1 x (top + 1)
    log_fact = _log_factorials(top)
    log_q, log_1mq = math.log(q), math.log1p(-q)
    x = (np.arange(top + 1) - 1) * base[: top + 1]  # (l - 1) eps(l)
    with np.errstate(divide="ignore"):
        excess = np.empty(top + 1)
        excess[:2] = -np.inf  # l = 0, 1: in the 1
        excess[2:3] = np.log(np.expm1(x[2:3]))  # log(e^eps(2) - 1)
        excess[3:] = x[3:] + np.log(3.0 - np.exp(-x[3:]))  # log(3 e^x - 1), x >= 0
    log_comb = log_fact[alphas] - log_fact[ls] - log_fact[np.clip(alphas - ls, 0, None)]
    terms = log_comb + ls * log_q + (alphas - ls) * log_1mq + excess[None, :]
    terms[np.broadcast_to(ls, terms.shape) > alphas] = -np.inf  # l runs to alpha
    peak = terms.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_s = peak[:, 0] + np.log(np.exp(terms - peak).sum(axis=1))
    log_s = np.where(np.isneginf(peak[:, 0]), -np.inf, log_s)
    return np.logaddexp(0.0, log_s) / (alphas[:, 0] - 1)


@functools.lru_cache(maxsize=1024)
def _skellam_rdp_per_step(z: float, q: float, l2: float, l1: float, orders: tuple[int, ...]) -> tuple[float, ...]:
    """One step's RDP at every order: the subsampled bound, or the mechanism's own where that is smaller."""
    top = max(orders)
    base = np.array([0.0, 0.0, *(_skellam_rdp(alpha, z, l2, l1) for alpha in range(2, top + 1))])
    own = base[list(orders)]
    if q == 1.0:
        return tuple(float(v) for v in own)
    return tuple(float(v) for v in np.minimum(_subsampled_rdp(q, base, orders), own))


def _checked_orders(orders: Iterable[object]) -> tuple[int, ...]:
    checked = []
    for order in orders:
        if isinstance(order, numbers.Real) and not isinstance(order, bool) and float(order).is_integer():
            order = int(order)
        checked.append(_check_order(order))
    if not checked:
        raise ValueError("orders must hold at least one integer order >= 2.")
    return tuple(checked)


def history_rdp(*, history: Iterable[Sequence[Any]], orders: Sequence[int] = SKELLAM_ORDERS) -> list[float]:
    """The RDP of a composed history (Gaussian and Skellam entries) at each integer order: the sum over entries
    of steps x one step's RDP (Gaussian: `rdp_of_sampled_gaussian`; Skellam: the subsampled bound)."""
    from fedtower.privacy.accounting import _rdp_per_step  # the Gaussian per-step values, cached there

    checked = checked_history(list(history))
    orders = _checked_orders(orders)
    total = np.zeros(len(orders))
    for entry in checked:
        if is_skellam_entry(entry):
            _, z, q, steps, l2, l1 = entry
            per_step = _skellam_rdp_per_step(z, q, l2, l1, orders)
        else:
            z, q, steps = entry
            per_step = _rdp_per_step(z, q, tuple(float(order) for order in orders))
        total += steps * np.asarray(per_step)
    return [float(v) for v in total]


def skellam_epsilon(
    *, history: Iterable[Sequence[Any]], delta: float, orders: Sequence[int] = SKELLAM_ORDERS
) -> float:
    """ε at `delta` of a composed history with Skellam (and Gaussian) entries: RDP at integer orders, added
    over entries, converted with Balle et al. 2020 (`epsilon_from_rdp`). 0.0 for an empty history."""
    checked = checked_history(list(history))
    delta = check_delta(delta)
    if not checked:
        return 0.0
    orders = _checked_orders(orders)
    return float(epsilon_from_rdp(orders=orders, rdp=history_rdp(history=checked, orders=orders), delta=delta)[0])


def skellam_noise_multiplier_for(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    l2_sensitivity: float,
    l1_sensitivity: float,
    fixed_history: Iterable[Sequence[Any]] = (),
    relative_tolerance: float = 1e-6,
) -> float:
    """The smallest noise multiplier z (to `relative_tolerance`) keeping `steps` Skellam steps within the target.

    The steps are ["skellam", z, sample_rate, steps, l2_sensitivity, l1_sensitivity] composed after
    `fixed_history` (releases whose noise is already set). Bisection on z: deterministic, so every site
    computes the same z from the same public inputs. The result's ε is at most target_epsilon.
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, numbers.Real) \
            or not math.isfinite(target_epsilon) or target_epsilon <= 0:  # fmt: skip
        raise ValueError(f"target_epsilon must be a positive finite number; got {target_epsilon!r}.")
    delta = check_delta(target_delta, name="target_delta")
    q = check_sample_rate(sample_rate)
    steps = check_steps(steps)
    l2 = _check_positive(l2_sensitivity, "l2_sensitivity")
    l1 = _check_positive(l1_sensitivity, "l1_sensitivity")
    if not 0 < relative_tolerance < 1:
        raise ValueError(f"relative_tolerance must be in (0, 1); got {relative_tolerance!r}.")
    fixed = checked_history(list(fixed_history), name="fixed_history")
    orders = SKELLAM_ORDERS
    fixed_rdp = np.asarray(history_rdp(history=fixed, orders=orders)) if fixed else np.zeros(len(orders))

    def epsilon(z: float) -> float:
        per_step = _skellam_rdp_per_step.__wrapped__(z, q, l2, l1, orders)  # uncached: every z is new
        total = fixed_rdp + steps * np.asarray(per_step)
        return float(epsilon_from_rdp(orders=orders, rdp=list(total), delta=delta)[0])

    ceiling = 1e6
    floor = epsilon(ceiling)
    if floor > target_epsilon:
        raise ValueError(
            f"No Skellam noise multiplier up to {ceiling:g} reaches ε={target_epsilon} at δ={delta} over {steps} "
            f"steps at sample rate {q}" + (f" on top of {fixed} (already spent or planned)" if fixed else "")
            + f" (ε {floor:.4g} even then); raise the budget or take fewer steps."
        )
    low, high = 0.0, 1.0
    while epsilon(high) > target_epsilon:
        low, high = high, 2.0 * high
    for _ in range(200):
        if high - low <= relative_tolerance * high:
            break
        middle = (low + high) / 2.0
        if epsilon(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return float(high)


# ---------------------------------------------------------------- the sampler


def _check_mu_size(mu: object, size: object) -> tuple[float, int]:
    if isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not math.isfinite(mu) or not 0 < mu <= MAX_MU:
        raise ValueError(f"mu (the mean of each Poisson variable) must be a finite number in (0, 2^48]; got {mu!r}.")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
        raise ValueError(f"size must be a non-negative integer (the number of noise values); got {size!r}.")
    return float(mu), int(size)


def secure_poisson(randomness: DPRandom, *, mu: float, size: int) -> np.ndarray:
    """`size` independent Poisson(mu) values (int64), all randomness from `randomness.uniform`."""
    if not isinstance(randomness, DPRandom):
        raise ValueError(f"randomness must be a DPRandom (the secure source); got {type(randomness).__name__}.")
    mu, size = _check_mu_size(mu, size)
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    if mu < PTRS_THRESHOLD:
        return _poisson_inversion(randomness, mu, size)
    return _poisson_ptrs(randomness, mu, size)


def skellam_noise(randomness: DPRandom, *, mu: float, size: int) -> np.ndarray:
    """`size` independent Sk(mu, mu) values (int64): each Poisson(mu) - Poisson(mu), variance 2 mu.

    All randomness comes from `randomness` (a `DPRandom`: AES-CTR keyed from os.urandom, or a
    test-only seed); never from numpy's or torch's generators.
    """
    if not isinstance(randomness, DPRandom):
        raise ValueError(f"randomness must be a DPRandom (the secure source); got {type(randomness).__name__}.")
    mu, size = _check_mu_size(mu, size)
    draws = secure_poisson(randomness, mu=mu, size=2 * size)
    return draws[:size] - draws[size:]


def _poisson_inversion(randomness: DPRandom, mu: float, size: int) -> np.ndarray:
    """Inversion of the CDF: X = min{k : F(k) >= U}. The table reaches where the pmf is below 1e-40."""
    top = int(mu + 14.0 * math.sqrt(mu) + 40.0)
    ks = np.arange(top + 1)
    log_pmf = -mu + ks * math.log(mu) - np.array([math.lgamma(k + 1.0) for k in range(top + 1)])
    cdf = np.cumsum(np.exp(log_pmf))
    draws = np.searchsorted(cdf, randomness.uniform(size), side="left")
    return np.minimum(draws, top).astype(np.int64)  # U above the last rounded F(k): mass below 1e-16


def _log_poisson_pmf(k: np.ndarray, mu: float) -> np.ndarray:
    """log(e^-mu mu^k / k!) for float k >= 0, stable for large k and mu.

    For k >= 16: -(k log(k/mu) - (k - mu)) - log(2 pi k)/2 - s(k), with Stirling's correction
    s(k) = 1/(12k) - 1/(360k^3) + 1/(1260k^5) (next term below 1e-11 there); no cancellation of
    terms of size mu log mu, as -mu + k log mu - log k! has.
    """
    out = np.empty_like(k)
    small = k < _STIRLING_FROM
    if small.any():
        ks = k[small]
        out[small] = -mu + ks * math.log(mu) - _LOG_FACTORIAL[ks.astype(np.int64)]
    large = ~small
    if large.any():
        kl = k[large]
        d = kl - mu
        inverse = 1.0 / kl
        inverse2 = inverse * inverse
        stirling = inverse * (1.0 / 12.0 - inverse2 * (1.0 / 360.0 - inverse2 / 1260.0))
        out[large] = -(kl * np.log1p(d / mu) - d) - _HALF_LOG_TWO_PI - 0.5 * np.log(kl) - stirling
    return out


def _poisson_ptrs(randomness: DPRandom, mu: float, size: int) -> np.ndarray:
    """Hörmann's PTRS, vectorised: candidates in chunks, the accepted ones kept in order.

    Keeping the first accepted candidates of independent trials keeps them independent and Poisson.
    k = floor((2a/us + b) U + mu + 0.43) is computed as floor(mu) + floor((2a/us + b) U + frac(mu) + 0.43),
    so the floor stays exact for large mu.
    """
    slam = math.sqrt(mu)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    log_inv_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    vr = 0.9277 - 3.6224 / (b - 2.0)
    whole = math.floor(mu)
    offset = (mu - whole) + 0.43
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        need = size - filled
        count = min(_CHUNK, int(need * 1.15) + 64)
        uniforms = randomness.uniform(2 * count)
        u = uniforms[:count] - 0.5
        v = uniforms[count:]
        us = 0.5 - np.abs(u)
        k = np.floor((2.0 * a / us + b) * u + offset) + whole
        accept = (us >= 0.07) & (v <= vr)
        maybe = np.flatnonzero(~accept & (k >= 0) & ~((us < 0.013) & (v > us)))
        if maybe.size:
            um = us[maybe]
            left = np.log(v[maybe]) + log_inv_alpha - np.log(a / (um * um) + b)
            accept[maybe] = left <= _log_poisson_pmf(k[maybe], mu)
        values = k[accept][:need]
        out[filled : filled + values.size] = values
        filled += values.size
    return out


__all__ = [
    "MAX_MU",
    "SKELLAM",
    "SKELLAM_ORDERS",
    "history_rdp",
    "poisson_subsampled_rdp",
    "secure_poisson",
    "skellam_epsilon",
    "skellam_entry",
    "skellam_noise",
    "skellam_noise_multiplier_for",
    "skellam_rdp",
]
