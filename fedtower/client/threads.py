"""How many torch threads a client computes with.

torch starts with one thread per core it sees. On a shared partner machine, or
beside other Ray workers in a simulation, more threads than free cores makes
every step wait on the others (measured: a DP step falls from ~450 to 2 steps/s
with 2 threads and one busy process on 2 cores). A client therefore uses the
threads it was given: node config `torch-threads` when the site sets it; in a
simulation, the run's `client-num-cpus` (what Ray reserved for it); otherwise
the cores this process may run on, capped at DEFAULT_MAX_THREADS.
"""

from __future__ import annotations

import math
import os

DEFAULT_MAX_THREADS = 4  # past this, one client's small matrix products gain little and crowd the rest


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity on this platform
        return max(1, os.cpu_count() or 1)


def client_threads(*, node_threads: int | None, simulated: bool, client_num_cpus: float) -> int:
    if node_threads is not None:
        return node_threads
    if simulated:
        return max(1, math.floor(client_num_cpus))
    return min(available_cores(), DEFAULT_MAX_THREADS)


def use_client_threads(settings, node) -> int:
    """Set torch's intra-op threads for this message's work; returns the count."""
    import torch

    threads = client_threads(node_threads=node.torch_threads, simulated=node.partition_id is not None,
                             client_num_cpus=settings.client_num_cpus)  # fmt: skip
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
