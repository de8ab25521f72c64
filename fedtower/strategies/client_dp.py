"""Client-level differential privacy for one-person clients, with Flower's own DP wrappers.

What it protects. Where each client is one person (cross-device), protecting a
person means protecting a whole client. Every client's item-tower update (its
returned arrays minus the global arrays it was sent) is clipped to L2 norm
`clipping_norm`; the server averages the n sampled updates with equal weights
and adds Gaussian noise of standard deviation
`noise_multiplier * clipping_norm / n` to the average. Two federations are
neighbours when they differ by one client added or removed, i.e. one person
with all of their events. Flower's RDP accountant composes one Gaussian
release per aggregated round and reports the epsilon spent at `target_delta`.

What it does not protect.
- The server sees every individual update before the noise: raw in
  "server-side" mode (the server clips), clipped in "client-side" mode
  (Flower's `fixedclipping_mod` clips on the client). The guarantee covers
  what the server releases (the item tower), not a curious server. Hiding
  single updates from the server needs secure aggregation; SecAgg+ exists only
  in Flower's legacy API in 1.41, which fedtower does not use.
- Clients send no training metrics (only `num-examples = 1`) and withhold
  evaluation unless the site opts in to exact sums (`allow-raw-evaluation`).
- The server adds the noise, so it knows it: this protects users against
  whoever reads the released model, never against the coordinator. The
  noise comes from fedtower's cryptographic source (`SecureNoise`), not from
  NumPy's global generator that Flower uses.

Why no amplification by sampling is claimed. Amplification needs a secret,
random (e.g. Poisson) choice of participants. fedtower samples a fixed number
of clients with Python's `random`, seeded per round from the run config, so
the sample is neither Poisson nor secret; and Flower's fixed-clipping
accountant accepts only `SamplingMethod.NO_AMPLIFICATION`. Each round is
therefore accounted as a full Gaussian mechanism over the whole population.

A sample of part of the population (fraction-train below 1). Its size is fixed,
so adding or removing one person can change who else is sampled: the rounds of
two neighbouring federations can then differ by one client's update replaced
by another's, which moves the sum by up to 2 x `clipping_norm`. By the joint
quasi-convexity of Renyi divergence (over the coupled samples) a round is then
no worse than a Gaussian mechanism of sensitivity 2 x clip. The accountant is
told noise_multiplier / 2 and the noise stays noise_multiplier x clip / n.
With every client sampled (fraction-train 1.0) the sensitivity is the clip.

A server optimizer (FedAdam, FedYogi) steps from the noisy mean, never inside
the wrapper (`optimizer_over_dp_mean`): what it computes is post-processing.

Equal weights. FedAvg weights each reply by its `num-examples`; unequal
weights would let one client move the mean by more than
`clipping_norm / n` and would leak dataset sizes. fedtower's clients send
`num-examples = 1` under client-level DP, and the caller must make sure they
do: Flower's wrapper checks it at every aggregation and raises ValueError
("Accounted aggregation requires equal client weights."), which stops the run.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedYogi,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.supercore.differential_privacy import compute_stdv

from fedtower.privacy.secure_random import DPRandom
from fedtower.strategies.poisson_client_dp import PoissonClientDP

log = logging.getLogger("fedtower.server")

CLIENT_DP_MODES = ("off", "server-side", "client-side")  # Flower's wrappers; "poisson" is PoissonClientDP


class SecureNoise:
    """Gaussian noise from fedtower's cryptographic source instead of NumPy's global generator.

    Flower adds the noise with `np.random.normal`: a Mersenne Twister whose state anyone can
    solve for from enough outputs (the noise on item rows no client updated is such an output),
    and that any `np.random.seed` in the server process makes reproducible. Overriding the one
    method that draws it keeps the rest of Flower's wrapper (clipping, accounting) as it is.
    """

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        # The accountant's noise multiplier is relative to the sensitivity; the noise is relative to the clip.
        factor = getattr(self, "sensitivity_factor", 1.0)
        std = compute_stdv(self.noise_multiplier * factor, self.clipping_norm, self.num_sampled_clients)
        randomness = DPRandom()
        noisy = {}
        for key, array in aggregated_arrays.items():
            values = array.numpy()
            noise = randomness.standard_normal(values.shape, dtype=torch.float64).numpy()
            noisy[key] = Array(np.asarray(values + std * noise, dtype=values.dtype))
        log.info("Client-level DP: Gaussian noise of std %.4g added from a secure source.", std)
        return ArrayRecord(noisy)


class SecureServerSideFixedClipping(SecureNoise, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP wrapper, with secure noise."""


class SecureClientSideFixedClipping(SecureNoise, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper (clipping by fixedclipping_mod), with secure noise."""


WRAPPERS = {
    "server-side": SecureServerSideFixedClipping,
    "client-side": SecureClientSideFixedClipping,
}
DP_WRAPPERS = (DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyClientSideFixedClipping)


def wrap_client_level_dp(
    inner: FedAvg,
    *,
    mode: str,
    noise_multiplier: float,
    clipping_norm: float,
    num_sampled_clients: int,
    target_delta: float,
    population_size: int,
    max_epsilon: float | None = None,
) -> Strategy:
    """`inner` itself for mode "off", else Flower's fixed-clipping DP wrapper around it, with an RDP accountant.

    What Flower's wrapper then demands of a run:
    - "client-side" needs `fixedclipping_mod` on the ClientApp's train handler
      only (evaluate messages carry no clipping norm, so the mod fails them);
    - each round must sample exactly `num_sampled_clients` nodes, or
      configure_train raises ValueError;
    - a round with any error reply, or with fewer replies than sampled, is
      skipped: nothing is released and no epsilon is spent;
    - replies must carry equal `num-examples`, or aggregation raises ValueError;
    - an update of exactly zero (the global arrays sent back unchanged) makes
      Flower 1.41 divide by zero while clipping;
    - with `max_epsilon`, configure_train raises PrivacyBudgetExhausted before a
      round whose release would exceed it.
    """
    if mode not in CLIENT_DP_MODES:
        raise ValueError(f"mode must be one of {', '.join(CLIENT_DP_MODES)}, got {mode!r}.")
    if mode == "off":
        return inner
    _check_settings(inner, noise_multiplier, clipping_norm, num_sampled_clients, target_delta,
                    population_size, max_epsilon)  # fmt: skip
    config = PrivacyConfig(
        target_delta=target_delta,
        population_size=population_size,
        # The only relation Flower pairs with no amplification; it is also the
        # one we mean: one person (one client) more or fewer.
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=max_epsilon,
    )
    # A sample of some of the population is fixed in size: one person more or fewer can change who else is
    # sampled, so neighbouring rounds may differ by one client's update replaced by another's. That
    # substitution moves the sum by up to 2 x clip, and the accountant is told the noise relative to it.
    factor = 1.0 if num_sampled_clients == population_size else 2.0
    wrapper = WRAPPERS[mode](inner, noise_multiplier / factor, clipping_norm, num_sampled_clients,
                             accountant=RdpAccountant(config))  # fmt: skip
    wrapper.sensitivity_factor = factor
    return wrapper


class _ReleasedMean(FedOpt):
    """Takes the place of FedAvg's mean inside Flower's FedAdam or FedYogi: the mean their update starts from
    is the DP wrapper's noisy release. Everything the optimizer computes after it (moments, step) is a
    function of DP releases only, i.e. post-processing, so the accountant's epsilon stays exact. (Putting
    the optimizer inside the wrapper would not do: the wrapper adds its noise to the optimizer's output,
    whose sensitivity to one client is not the mean's clip / n.)"""

    released_mean: Strategy

    @property
    def checks_replies(self) -> bool:
        return getattr(self.released_mean, "checks_replies", False)

    def configure_train(self, server_round, arrays, config, grid):
        self.current_arrays = {key: array.numpy() for key, array in arrays.items()}
        return self.released_mean.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.released_mean.aggregate_train(server_round, replies)

    def summary(self) -> None:
        super().summary()
        log.info("  ... applied to the noisy mean of:")
        self.released_mean.summary()


class FedAdamOverDPMean(FedAdam, _ReleasedMean):
    """Flower's FedAdam applied to a client-level DP mean (post-processing)."""


class FedYogiOverDPMean(FedYogi, _ReleasedMean):
    """Flower's FedYogi applied to a client-level DP mean (post-processing)."""


SERVER_OPTIMIZERS_OVER_DP = {"fedadam": FedAdamOverDPMean, "fedyogi": FedYogiOverDPMean}


def optimizer_over_dp_mean(name: str, released_mean: Strategy, **arguments) -> FedOpt:
    """Flower's FedAdam or FedYogi (built with `arguments`) stepping from `released_mean`'s noisy average."""
    if name not in SERVER_OPTIMIZERS_OVER_DP:
        raise ValueError(f"Only {', '.join(SERVER_OPTIMIZERS_OVER_DP)} can step from a client-level DP mean, "
                         f"got {name!r}.")  # fmt: skip
    optimizer = SERVER_OPTIMIZERS_OVER_DP[name](**arguments)
    optimizer.released_mean = released_mean
    return optimizer


def dp_wrapper_of(strategy: Strategy) -> Strategy:
    """The Flower DP wrapper inside `strategy` (itself, or the mean a server optimizer steps from)."""
    return getattr(strategy, "released_mean", strategy)


def client_dp_epsilon(strategy: Strategy) -> float | None:
    """Epsilon spent so far (at the configured target delta) by Flower's accountant; None without client-level DP."""
    strategy = dp_wrapper_of(strategy)
    if isinstance(strategy, PoissonClientDP):
        return strategy.epsilon()
    if not isinstance(strategy, DP_WRAPPERS) or strategy.accountant is None:
        return None
    return strategy.privacy_spent().epsilon


def accountant_state(strategy: Strategy) -> dict | None:
    """The accountant's JSON-serialisable state, to checkpoint with the item tower; None without client-level DP."""
    strategy = dp_wrapper_of(strategy)
    if isinstance(strategy, PoissonClientDP):
        return strategy.state_dict()
    if not isinstance(strategy, DP_WRAPPERS) or strategy.accountant is None:
        return None
    return strategy.accountant.state_dict()


def restore_accountant_state(strategy: Strategy, state: dict) -> None:
    """Continue the accountant of a resumed run, so epsilon keeps composing instead of restarting at 0."""
    strategy = dp_wrapper_of(strategy)
    if isinstance(strategy, PoissonClientDP):
        strategy.load_state_dict(state)
        return
    if not isinstance(strategy, DP_WRAPPERS) or strategy.accountant is None:
        raise ValueError("Cannot restore a privacy accountant: this strategy does not use client-level DP.")
    strategy.accountant.load_state_dict(state)


def calibrated_noise_multiplier(*, target_epsilon: float, target_delta: float, rounds: int,
                                population_size: int, num_sampled_clients: int) -> float:
    """The smallest noise multiplier (to 0.1%) whose `rounds` releases Flower's accountant puts at or below
    `target_epsilon` at `target_delta`: what a planned client-level DP run needs. Bisection over the same
    accountant the run will report from, so the plan and the report cannot disagree."""
    if not _positive(target_epsilon) or not _whole(rounds) or rounds < 1:
        raise ValueError(f"target_epsilon must be positive and rounds at least 1, got {target_epsilon!r}, {rounds!r}.")
    config = PrivacyConfig(target_delta=target_delta, population_size=population_size,
                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                           sampling_method=SamplingMethod.NO_AMPLIFICATION)  # fmt: skip

    def epsilon(noise: float) -> float:
        accountant = RdpAccountant(config)
        accountant.compose(GaussianPrivacyEvent(noise_multiplier=noise, sample_size=num_sampled_clients,
                                                population_size=population_size), count=rounds)  # fmt: skip
        return accountant.get_epsilon(target_delta)

    low, high = 0.05, 1.0
    while epsilon(high) > target_epsilon:
        low, high = high, high * 2
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if epsilon(middle) > target_epsilon else (low, middle)
    return high


def _check_settings(inner, noise_multiplier, clipping_norm, num_sampled_clients, target_delta,
                    population_size, max_epsilon) -> None:  # fmt: skip
    # Flower adds the noise to the inner strategy's aggregate and calibrates it
    # to a plain mean of clipped updates; any other aggregation changes the
    # sensitivity, so the accountant's epsilon would be wrong.
    if type(inner) is not FedAvg:
        raise ValueError(
            f"Client-level DP needs a plain FedAvg inner strategy, got {type(inner).__name__}: Flower's "
            "accountant is only valid for FedAvg's unmodified aggregation (an equally weighted mean of "
            "clipped updates), which server optimizers and robust rules replace."
        )
    if inner.weighted_by_key != "num-examples":
        raise ValueError(
            "Client-level DP needs FedAvg to weight replies by 'num-examples', which fedtower's clients "
            f"set to 1 so that every client weighs the same; got weighted_by_key={inner.weighted_by_key!r}."
        )
    if not _positive(noise_multiplier):
        raise ValueError(f"noise_multiplier must be a positive number under client-level DP, got {noise_multiplier!r}.")
    if not _positive(clipping_norm):
        raise ValueError(f"clipping_norm must be a positive number, got {clipping_norm!r}.")
    if not _whole(num_sampled_clients) or num_sampled_clients < 1:
        raise ValueError(f"num_sampled_clients must be a whole number of at least 1, got {num_sampled_clients!r}.")
    if not _whole(population_size) or population_size < num_sampled_clients:
        raise ValueError(
            f"population_size must be a whole number no smaller than num_sampled_clients "
            f"({num_sampled_clients}), got {population_size!r}."
        )
    if not _number(target_delta) or not 0 < target_delta < 1:
        raise ValueError(f"target_delta must be strictly between 0 and 1, got {target_delta!r}.")
    if max_epsilon is not None and not _positive(max_epsilon):
        raise ValueError(f"max_epsilon must be a positive number (or None for no limit), got {max_epsilon!r}.")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value) -> bool:
    return _number(value) and value > 0


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
