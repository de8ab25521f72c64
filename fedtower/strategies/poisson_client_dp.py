"""Client-level DP with secret Poisson sampling: DP-FedAvg (McMahan et al. 2018) with amplification.

Each round every connected client is chosen independently with probability
`sample_rate` (q) from fedtower's cryptographic source, never from the run
config, the seed or the round. Each chosen client's item-tower update is
clipped to L2 norm `clipping_norm` (C); the server adds N(0, (sigma C)^2) noise
to their sum and divides by the expected count q N, a public constant:

    new tower = tower + (sum of clipped updates + N(0, (sigma C)^2 I)) / (q N)

One client (one person) added or removed changes the sum by at most C whether
or not it was chosen, which is the sampled Gaussian mechanism. fedtower's RDP
accountant (`ClientAccountant`, Opacus's analysis of Mironov et al. 2019)
composes one step of it per round at rate q, noise sigma.

Against whom. Amplification by sampling holds for whoever does not know who
was chosen: readers of the released item tower, and other clients (each knows
only whether it was chosen itself). The coordinator chooses, and sees every
update before the noise, so nothing here protects against it; that needs
secure aggregation (fedtower's federation-wide DP mode). For the same reason
the number of chosen clients is a private quantity: fedtower neither logs it
nor puts it into the run's metrics (Flower's own log, "Received N results", and
the round timings in the coordinator's run directory do show it).

What the mechanism keeps to, so that the accountant's epsilon is the truth:
- the population N is fixed for the run and is every connected node; a round
  that finds a different number refuses to run;
- every round is a release and is accounted, whatever happens: a chosen client
  that fails, times out or sends a malformed or non-finite tower contributes
  nothing (as if it had left), and a round with no one chosen releases noise;
- the denominator never depends on who replied.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtower.privacy.accounting import ClientAccountant
from fedtower.privacy.secure_random import DPRandom

log = logging.getLogger("fedtower.server")


class PoissonClientDP(FedAvg):
    """DP-FedAvg over clients chosen by secret Poisson sampling, accounted with amplification."""

    checks_replies = True  # replies are validated here, so that a rejected one still leaves an accounted release

    def __init__(
        self,
        *,
        sample_rate: float,
        noise_multiplier: float,
        clipping_norm: float,
        population_size: int,
        target_delta: float,
        expected_arrays: dict[str, tuple[tuple[int, ...], str]],
        max_epsilon: float | None = None,
        **fedavg_arguments,
    ) -> None:
        super().__init__(**{**fedavg_arguments, "fraction_train": sample_rate})
        if not _real(sample_rate) or not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}.")
        if not _real(noise_multiplier) or not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be a positive number, got {noise_multiplier!r}.")
        if not _real(clipping_norm) or not clipping_norm > 0:
            raise ValueError(f"clipping_norm must be a positive number, got {clipping_norm!r}.")
        if isinstance(population_size, bool) or not isinstance(population_size, int) or population_size < 1:
            raise ValueError(f"population_size must be a whole number of at least 1, got {population_size!r}.")
        if not _real(target_delta) or not 0 < target_delta < 1:
            raise ValueError(f"target_delta must be strictly between 0 and 1, got {target_delta!r}.")
        if max_epsilon is not None and (not _real(max_epsilon) or not max_epsilon > 0):
            raise ValueError(f"max_epsilon must be a positive number (or None for no limit), got {max_epsilon!r}.")
        if not expected_arrays:
            raise ValueError("expected_arrays must name the item tower's arrays.")
        self.sample_rate = float(sample_rate)
        self.noise_multiplier = float(noise_multiplier)
        self.clipping_norm = float(clipping_norm)
        self.population_size = population_size
        self.target_delta = float(target_delta)
        self.max_epsilon = max_epsilon
        self.expected_arrays = expected_arrays
        self.accountant = ClientAccountant()
        self.current_arrays: ArrayRecord | None = None
        self.rejected: list[tuple[int, int, str]] = []

    @property
    def expected_count(self) -> float:
        return self.sample_rate * self.population_size

    def epsilon(self) -> float:
        return self.accountant.epsilon(delta=self.target_delta)

    def summary(self) -> None:
        log.info("Client-level DP, Poisson sampling (fedtower.strategies.PoissonClientDP):")
        log.info("  each of %d clients chosen with probability %.4g from a secure source (%.1f expected)",
                 self.population_size, self.sample_rate, self.expected_count)  # fmt: skip
        log.info("  updates clipped to L2 %.4g; noise std %.4g on the sum, divided by %.1f", self.clipping_norm,
                 self.noise_multiplier * self.clipping_norm, self.expected_count)  # fmt: skip
        log.info("  RDP accountant, delta %.2e%s", self.target_delta,
                 f", run stops before epsilon {self.max_epsilon:g}" if self.max_epsilon else "")  # fmt: skip

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        from fedtower.strategies.item_tower import FederationFinished

        nodes = sorted(grid.get_node_ids())
        if len(nodes) != self.population_size:
            raise ValueError(
                f"Round {server_round}: {len(nodes)} nodes are connected, but the run was accounted for a "
                f"population of {self.population_size}; the sampling rate and epsilon hold only for that population."
            )
        if self.max_epsilon is not None and (after := self.accountant.epsilon_after(
                delta=self.target_delta, noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                steps=1)) > self.max_epsilon:  # fmt: skip
            raise FederationFinished(
                f"Round {server_round} would take client-level epsilon to {after:.3f}, past max-epsilon "
                f"{self.max_epsilon:g}; ending the run after round {server_round - 1}."
            )
        self.current_arrays = arrays
        chosen = [nodes[i] for i in DPRandom().poisson_sample(len(nodes), self.sample_rate)]
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, chosen, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.current_arrays is None:
            raise RuntimeError("aggregate_train before configure_train: there is no tower to update.")
        current = {key: self.current_arrays[key].numpy().astype(np.float64) for key in self.expected_arrays}
        total = {key: np.zeros_like(value) for key, value in current.items()}
        for message in replies:
            update = self._clipped_update(server_round, message, current)
            if update is not None:
                for key in total:
                    total[key] += update[key]
        randomness = DPRandom()
        std = self.noise_multiplier * self.clipping_norm
        tower = {}
        for key, value in current.items():
            noise = randomness.standard_normal(value.shape, dtype=torch.float64).numpy()
            tower[key] = Array(np.asarray(value + (total[key] + std * noise) / self.expected_count,
                                          dtype=self.expected_arrays[key][1]))  # fmt: skip
        # Accounted after the noise is drawn and before the tower leaves this method: every round is a release.
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=1)
        log.info("Round %d: client-level DP release (Poisson rate %.4g, noise multiplier %.4g), epsilon %.3f.",
                 server_round, self.sample_rate, self.noise_multiplier, self.epsilon())  # fmt: skip
        return ArrayRecord(tower), MetricRecord({})

    def _clipped_update(self, server_round: int, message: Message, current: dict) -> dict | None:
        """The reply's update clipped to the norm; None (it contributes nothing) if it cannot be used."""
        from fedtower.strategies.item_tower import reply_problem

        node = message.metadata.src_node_id
        if message.has_error():
            log.warning("Round %d: node %d failed: %s", server_round, node, message.error.reason)
            return None
        problem = reply_problem(message, self.expected_arrays)
        if problem is not None:
            self.rejected.append((server_round, node, problem))
            log.warning("Round %d: rejected the reply of node %d: %s", server_round, node, problem)
            return None
        arrays = next(record for record in message.content.values() if isinstance(record, ArrayRecord))
        update = {key: arrays[key].numpy().astype(np.float64) - current[key] for key in current}
        norm = math.sqrt(sum(float(np.sum(u * u)) for u in update.values()))
        scale = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
        return {key: u * scale for key, u in update.items()}

    def state_dict(self) -> dict:
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state)


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

