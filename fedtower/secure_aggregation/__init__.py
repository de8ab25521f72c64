"""Secure aggregation (SecAgg) on Flower's crypto primitives, with AES-256-CTR mask expansion.

`protocol` holds the transport-agnostic stages (site and coordinator sides);
`masks` the mask PRG. See `fedtower.secure_aggregation.protocol` for the
protocol, its threat model and why Flower's mask PRG is not used.
"""

from fedtower.secure_aggregation.masks import expand_mask
from fedtower.secure_aggregation.protocol import (
    SecAggAbort,
    SecAggConfig,
    SecAggError,
    SecAggRefusal,
    SecAggServer,
    SecAggSite,
    decode_signed,
    encode_signed,
    run_in_memory,
)

__all__ = [
    "SecAggAbort",
    "SecAggConfig",
    "SecAggError",
    "SecAggRefusal",
    "SecAggServer",
    "SecAggSite",
    "decode_signed",
    "encode_signed",
    "expand_mask",
    "run_in_memory",
]
