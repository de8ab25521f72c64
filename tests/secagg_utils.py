"""What a test can check of a secure-aggregation round from outside: the released item tower and the
inputs the sites recorded on their own disks (node config test-only-secagg-record).

The coordinator's step on an embedding table is plain SGD on the unmasked sum:
    after = before - table_lr * sum / (units_per_gradient * expected_batch),
so the sum the coordinator unmasked can be read back from two consecutive item towers, on the
table coordinates, to float32 rounding (far below one integer unit at these sizes).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fedtower.config import RunSettings
from fedtower.server.federation import initial_item_tower
from fedtower.server.run_dir import RunDirectory
from fedtower.strategies.secure_dp import TABLE_SUFFIXES


def item_tower(run_path: Path, settings: RunSettings, server_round: int) -> dict[str, np.ndarray]:
    """The released item tower after `server_round` (0: the public initial one)."""
    if server_round == 0:
        return {key: array.numpy() for key, array in initial_item_tower(settings).items()}
    return RunDirectory(run_path, create=False).load_checkpoint(server_round).arrays


def unmasked_table_sum(before: dict[str, np.ndarray], after: dict[str, np.ndarray],
                       settings: RunSettings) -> dict[str, np.ndarray]:  # fmt: skip
    """The integer sum the coordinator stepped with, on each embedding table, recovered from the towers."""
    scale = (settings.secagg_scale / settings.max_grad_norm) * settings.dp_batch_size / settings.dp_table_lr
    return {key: (before[key].astype(np.float64) - after[key].astype(np.float64)) * scale
            for key in before if key.endswith(TABLE_SUFFIXES)}  # fmt: skip


def table_slices(vector: np.ndarray, tower: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A flat item-tower vector (the order of the tower's keys) cut into its embedding tables."""
    out, offset = {}, 0
    for key, value in tower.items():
        if key.endswith(TABLE_SUFFIXES):
            out[key] = vector[offset : offset + value.size].reshape(value.shape)
        offset += value.size
    assert offset == vector.size, (offset, vector.size)
    return out


def recorded_inputs(state_dir: Path, server_round: int) -> np.ndarray | None:
    """The integer vector a site put under its masks in `server_round`, or None if it sent none."""
    path = Path(state_dir) / "secagg-inputs" / f"round-{server_round}.npy"
    return np.load(path) if path.exists() else None


def raw_byte_needles(vector: np.ndarray) -> list[bytes]:
    """Byte strings that would show a site's input in a file: its first coordinates as int64, int32, uint32."""
    head = vector[:16]
    return [head.astype(np.int64).tobytes(), head.astype(np.int32).tobytes(),
            (head.astype(np.int64) % (1 << 32)).astype(np.uint32).tobytes()]  # fmt: skip


def files_holding(root: Path, needles: list[bytes], *, skip_part: str = "clients") -> list[Path]:
    """Files under `root` (outside any `skip_part` folder: the simulated sites' own state) that hold a needle."""
    found = []
    for path in Path(root).rglob("*"):
        if path.is_file() and skip_part not in path.parts:
            blob = path.read_bytes()
            if any(needle in blob for needle in needles):
                found.append(path)
    return found


def independent_secure_epsilon(history, delta: float, max_order: int = 64) -> float:
    """ε of a secure run's history, recomputed term by term in plain floats, sharing no code with the
    accountant: the Skellam bound in its variance form V = (z D2)^2 (as google-research's distributed_dp
    writes it), Zhu and Wang's subsampling sum, DP evaluations (Gaussian, q = 1: α / (2 σ^2)), and the
    Balle et al. conversion; orders where plain floats overflow are left out."""
    best = math.inf
    for a in range(2, max_order + 1):
        total = 0.0
        try:
            for entry in history:
                if isinstance(entry[0], str):
                    _, z, q, steps, d2, d1 = entry
                    v = (z * d2) ** 2

                    def base(j, d2=d2, d1=d1, v=v):
                        integers = min(((2 * j - 1) * d2**2 + 6 * d1) / (4 * v**2), 3 * d1 / (2 * v))
                        return j * d2**2 / (2 * v) + integers

                    s = (1 - q) ** (a - 1) * (a * q - q + 1)
                    s += math.comb(a, 2) * q**2 * (1 - q) ** (a - 2) * math.exp(base(2))
                    s += 3 * sum(math.comb(a, j) * (1 - q) ** (a - j) * q**j * math.exp((j - 1) * base(j))
                                 for j in range(3, a + 1))  # fmt: skip
                    total += steps * min(math.log(s) / (a - 1), base(a))
                else:
                    sigma, q, steps = entry
                    assert q == 1.0, "only DP evaluations (q = 1) are Gaussian entries of a secure run"
                    total += steps * a / (2 * sigma**2)
        except OverflowError:
            continue
        best = min(best, total - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a))
    return best
