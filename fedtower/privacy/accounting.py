"""Privacy accounting for DP-SGD on a client, and an independent accountant for auditors.

The client's accountant (`ClientAccountant`) wraps Opacus's RDP accountant
(RDP is the default: Opacus's PRV accountant fails on some inputs). Its
history is a list of (noise_multiplier, sample_rate, steps) entries composed
over every step of every round; it is what the client persists, what the
ledger carries, and all that is needed to recompute ε.

`independent_epsilon` recomputes ε from such a history without Opacus: its own
implementation of the Rényi DP of the sampled Gaussian mechanism (Mironov,
Talwar and Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian
Mechanism", Section 3.3) over the same orders Opacus uses, and the RDP to
(ε, δ) conversion of Balle et al. 2020 (Theorem 21). An auditor who trusts
neither the client nor Opacus checks one against the other.

A history may also hold entries of the distributed Skellam mechanism (secure
aggregation; see `fedtower.privacy.skellam`), tagged so that triples keep their
meaning: ["skellam", noise_multiplier, sample_rate, steps, l2_sensitivity,
l1_sensitivity]. A history with any such entry is accounted for at integer RDP
orders 2..256 (Gaussian entries by `rdp_of_sampled_gaussian`, Skellam entries by
the subsampled Skellam bound), by the same code for the client and the auditor:
Opacus and dp-accounting have no Skellam mechanism. A history of triples alone
is accounted for exactly as before.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MECHANISM = "rdp"
STATE_FORMAT = 1

# The RDP orders Opacus's RDPAccountant searches by default (its DEFAULT_ALPHAS),
# written out here so that the independent accountant does not read them from Opacus.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

SKELLAM = "skellam"  # the tag of a Skellam history entry

GaussianEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
# ("skellam", noise_multiplier, sample_rate, steps, l2_sensitivity, l1_sensitivity)
SkellamEntry = tuple[str, float, float, int, float, float]
HistoryEntry = GaussianEntry | SkellamEntry

_ENTRY_SHAPES = ('a [noise_multiplier, sample_rate, steps] triple or a ["skellam", noise_multiplier, '
                 "sample_rate, steps, l2_sensitivity, l1_sensitivity] entry")  # fmt: skip

# The fractional-order series stops at the first term (past i = α) below e^-30, as TF Privacy's does.
_NEGLIGIBLE_LOG_TERM = -30.0


# ---------------------------------------------------------------- validation


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_noise_multiplier(value: object, *, name: str = "noise_multiplier") -> float:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number; got {value!r}.")
    return float(value)


def check_sample_rate(value: object, *, name: str = "sample_rate") -> float:
    if not _is_real(value) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1]; got {value!r}.")
    return float(value)


def check_steps(value: object, *, name: str = "steps", minimum: int = 1) -> int:
    if not _is_integer(value) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
        raise ValueError(f"{name} must be {kind}; got {value!r}.")
    return int(value)


def check_delta(value: object, *, name: str = "delta") -> float:
    if not _is_real(value) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1); got {value!r}.")
    return float(value)


def checked_history(history: object, *, name: str = "history") -> list[HistoryEntry]:
    """A copy of `history` as checked tuples: (noise_multiplier, sample_rate, steps) for a Gaussian entry,
    ("skellam", noise_multiplier, sample_rate, steps, l2_sensitivity, l1_sensitivity) for a Skellam one.

    Raises ValueError naming the first bad entry and field, e.g. "history[2] (sample_rate) ...".
    """
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise ValueError(
            f"{name} must be a list of [noise_multiplier, sample_rate, steps] entries; got {type(history).__name__}."
        )
    checked: list[HistoryEntry] = []
    for index, entry in enumerate(history):
        where = f"{name}[{index}]"
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence):
            raise ValueError(f"{where} must be {_ENTRY_SHAPES}; got {entry!r}.")
        if len(entry) > 0 and isinstance(entry[0], str):
            if entry[0] != SKELLAM or len(entry) != 6:
                raise ValueError(f"{where} is a tagged entry, which must be [\"skellam\", noise_multiplier, "
                                 f"sample_rate, steps, l2_sensitivity, l1_sensitivity]; got {entry!r}.")  # fmt: skip
            _, noise_multiplier, sample_rate, steps, l2_sensitivity, l1_sensitivity = entry
            checked.append(
                (
                    SKELLAM,
                    check_noise_multiplier(noise_multiplier, name=f"{where} (noise_multiplier)"),
                    check_sample_rate(sample_rate, name=f"{where} (sample_rate)"),
                    check_steps(steps, name=f"{where} (steps)"),
                    check_noise_multiplier(l2_sensitivity, name=f"{where} (l2_sensitivity)"),
                    check_noise_multiplier(l1_sensitivity, name=f"{where} (l1_sensitivity)"),
                )
            )
            continue
        if len(entry) != 3:
            raise ValueError(f"{where} must be {_ENTRY_SHAPES}; got {entry!r}.")
        noise_multiplier, sample_rate, steps = entry
        checked.append(
            (
                check_noise_multiplier(noise_multiplier, name=f"{where} (noise_multiplier)"),
                check_sample_rate(sample_rate, name=f"{where} (sample_rate)"),
                check_steps(steps, name=f"{where} (steps)"),
            )
        )
    return checked


def skellam_entry(
    *, noise_multiplier: float, sample_rate: float, steps: int, l2_sensitivity: float, l1_sensitivity: float
) -> SkellamEntry:
    """The checked history entry of `steps` steps of the Poisson-subsampled distributed Skellam mechanism."""
    return checked_history([[SKELLAM, noise_multiplier, sample_rate, steps, l2_sensitivity, l1_sensitivity]],
                           name="skellam entry")[0]  # fmt: skip


def is_skellam_entry(entry: Sequence[Any]) -> bool:
    """Whether a history entry is a tagged Skellam entry (else a Gaussian triple)."""
    return len(entry) == 6 and isinstance(entry[0], str) and entry[0] == SKELLAM


def entry_steps(entry: Sequence[Any]) -> int:
    """The steps of a history entry, Gaussian or Skellam."""
    return entry[3] if is_skellam_entry(entry) else entry[2]


def entry_parameters(entry: Sequence[Any]) -> tuple:
    """Everything of an entry but its steps: entries with equal parameters merge by adding steps."""
    entry = tuple(entry)
    return (entry[:3] + entry[4:]) if is_skellam_entry(entry) else entry[:2]


def _with_steps(entry: Sequence[Any], steps: int) -> HistoryEntry:
    entry = tuple(entry)
    return (*entry[:3], steps, *entry[4:]) if is_skellam_entry(entry) else (entry[0], entry[1], steps)


def _append(history: list, entry: Sequence[Any]) -> None:
    """Append `entry` to `history` in place, merged into the last entry when its parameters match."""
    entry = tuple(entry)
    if history and entry_parameters(history[-1]) == entry_parameters(entry):
        history[-1] = _with_steps(history[-1], entry_steps(history[-1]) + entry_steps(entry))
    else:
        history.append(entry)


def add_steps(
    history: Iterable[HistoryEntry], *, noise_multiplier: float, sample_rate: float, steps: int
) -> list[HistoryEntry]:
    """A new history with `steps` more steps; merged into the last entry when its parameters match.

    This is how Opacus's RDPAccountant.step records one step at a time, so a
    history built here equals the one Opacus would have after the same steps.
    """
    merged = list(history)
    _append(merged, (noise_multiplier, sample_rate, steps))
    return merged


def compose(history: Iterable[HistoryEntry], added: Iterable[Sequence[Any]]) -> list[HistoryEntry]:
    """`history` followed by the `added` entries (Gaussian or Skellam), merged as `add_steps` merges them:
    an entry whose parameters (kind, noise multiplier, sample rate, and for Skellam the sensitivities)
    equal the last one's adds its steps to it."""
    composed = list(history)
    for entry in added:
        _append(composed, entry)
    return composed


def history_without(history: Iterable[Sequence[Any]], added: Iterable[Sequence[Any]]) -> list[HistoryEntry] | None:
    """The history before `added` was composed onto it; None when `history` does not end with `added`."""
    remaining = [tuple(entry) for entry in history]
    for entry in reversed(list(added)):
        if not remaining:
            return None
        last = remaining[-1]
        if entry_parameters(last) != entry_parameters(entry) or entry_steps(last) < entry_steps(entry):
            return None
        left = entry_steps(last) - entry_steps(entry)
        remaining[-1:] = [_with_steps(last, left)] if left > 0 else []
    return remaining


def has_skellam(history: Iterable[Sequence[Any]]) -> bool:
    """Whether any entry of `history` is a Skellam entry (then it is accounted for at integer orders)."""
    return any(is_skellam_entry(entry) for entry in history)


# ---------------------------------------------------------------- Opacus-backed accounting


def _opacus_epsilon(history: list[HistoryEntry], delta: float) -> float:
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant  # here, not at import: opacus costs ~4 s per ClientApp process

    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def _epsilon(history: list[HistoryEntry], delta: float) -> float:
    """Triples only: Opacus's RDPAccountant, as always. Any Skellam entry: RDP at integer orders."""
    if has_skellam(history):
        from fedtower.privacy.skellam import skellam_epsilon

        return skellam_epsilon(history=history, delta=delta)
    return _opacus_epsilon(history, delta)


class ClientAccountant:
    """One client's RDP accountant, composed over every step of every round.

    `history` holds (noise_multiplier, sample_rate, steps) entries, and ("skellam", noise_multiplier,
    sample_rate, steps, l2_sensitivity, l1_sensitivity) entries for rounds under secure aggregation.
    ε of a history of triples is computed by Opacus's RDPAccountant; with any Skellam entry, by
    `fedtower.privacy.skellam.skellam_epsilon`. The state round-trips through JSON, so the client
    persists it and ε keeps accumulating across rounds, runs and restarts.
    """

    mechanism = MECHANISM

    def __init__(self, history: Iterable[Sequence[Any]] = ()):
        self._history: list[HistoryEntry] = checked_history(list(history))

    @property
    def history(self) -> list[HistoryEntry]:
        """The composed entries, oldest first; a copy, safe to modify."""
        return list(self._history)

    @property
    def total_steps(self) -> int:
        return sum(entry_steps(entry) for entry in self._history)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Record `steps` DP-SGD steps taken with these parameters."""
        self._history = add_steps(
            self._history,
            noise_multiplier=check_noise_multiplier(noise_multiplier),
            sample_rate=check_sample_rate(sample_rate),
            steps=check_steps(steps),
        )

    def step_skellam(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, l2_sensitivity: float, l1_sensitivity: float
    ) -> None:
        """Record `steps` steps of the distributed Skellam mechanism with these parameters."""
        self.charge([skellam_entry(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                                   l2_sensitivity=l2_sensitivity, l1_sensitivity=l1_sensitivity)])  # fmt: skip

    def charge(self, added: Iterable[Sequence[Any]]) -> None:
        """Record releases given as history entries (Gaussian triples or Skellam entries), in order."""
        self._history = compose(self._history, checked_history(list(added), name="added"))

    def epsilon_with(self, added: Iterable[Sequence[Any]], *, delta: float) -> float:
        """ε after `added` releases more; the accountant is not changed."""
        return _epsilon(compose(self._history, checked_history(list(added), name="added")), check_delta(delta))

    def epsilon(self, *, delta: float) -> float:
        """ε spent so far at this δ; 0.0 before the first step."""
        return _epsilon(self._history, check_delta(delta))

    def epsilon_after(self, *, delta: float, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε this accountant would report after `steps` more steps; the accountant is not changed.

        A client calls this before training, to refuse a round that would take it past its budget.
        """
        planned = add_steps(
            self._history,
            noise_multiplier=check_noise_multiplier(noise_multiplier),
            sample_rate=check_sample_rate(sample_rate),
            steps=check_steps(steps),
        )
        return _epsilon(planned, check_delta(delta))

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: {"mechanism": "rdp", "history": [[nm, q, steps], ["skellam", ...], ...], "format": 1}."""
        return {
            "mechanism": MECHANISM,
            "history": [list(entry) for entry in self._history],
            "format": STATE_FORMAT,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this accountant's history with a saved one, after checking every field.

        A missing, garbled or foreign state raises ValueError; it never loads as an
        empty history, which would silently reset ε to zero.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"An accountant state must be a dict; got {type(state).__name__}.")
        expected = {"mechanism", "history", "format"}
        missing = sorted(expected - set(state))
        if missing:
            raise ValueError(
                f"The accountant state has no {', '.join(repr(m) for m in missing)} field; "
                "refusing to load it, since guessing could reset the privacy spent."
            )
        unknown = sorted(set(state) - expected)
        if unknown:
            raise ValueError(f"The accountant state has unknown fields {unknown}.")
        if state["format"] != STATE_FORMAT or isinstance(state["format"], bool):
            raise ValueError(
                f"The accountant state's 'format' is {state['format']!r}; this version reads format {STATE_FORMAT}."
            )
        if state["mechanism"] != MECHANISM:
            raise ValueError(
                f"The accountant state's 'mechanism' is {state['mechanism']!r}; only {MECHANISM!r} "
                "states can be loaded into a ClientAccountant."
            )
        self._history = checked_history(state["history"], name="history")

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> ClientAccountant:
        accountant = cls()
        accountant.load_state_dict(state)
        return accountant

    def __repr__(self) -> str:
        return f"ClientAccountant(history={self._history!r})"


def noise_multiplier_for(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    fixed_history: Iterable[Sequence[Any]] = (),
    epsilon_tolerance: float = 0.01,
) -> float:
    """The noise multiplier that keeps `steps` steps at `sample_rate` within (target_epsilon, target_delta).

    `fixed_history`: releases composed with those steps whose noise is already set (what was spent
    before, a DP count, planned DP evaluations; Skellam entries too). Opacus's binary search with the
    RDP accountant: the result's ε is at most target_epsilon and within `epsilon_tolerance` of it.
    """
    if not _is_real(target_epsilon) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be a positive finite number; got {target_epsilon!r}.")
    target_delta = check_delta(target_delta, name="target_delta")
    sample_rate = check_sample_rate(sample_rate)
    steps = check_steps(steps)
    fixed = checked_history(list(fixed_history), name="fixed_history")

    def epsilon(sigma: float) -> float:
        with warnings.catch_warnings():  # the search probes extreme noise, where the best order is an edge
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return _epsilon(compose(fixed, [(sigma, sample_rate, steps)]), target_delta)

    floor = epsilon(1e6)
    if floor > target_epsilon:
        raise ValueError(
            f"No noise multiplier up to 1e6 reaches ε={target_epsilon} at δ={target_delta} over {steps} "
            f"steps at sample rate {sample_rate}"
            + (f" on top of {fixed} (already spent or planned at a fixed noise)" if fixed else "")
            + f" (ε {floor:.4g} even then); raise the budget or take fewer steps."
        )
    # Opacus's get_noise_multiplier, with the fixed releases composed in.
    low, high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        high *= 2
        eps_high = epsilon(high)
    while target_epsilon - eps_high > epsilon_tolerance:
        sigma = (low + high) / 2
        eps = epsilon(sigma)
        if eps < target_epsilon:
            high, eps_high = sigma, eps
        else:
            low = sigma
    return float(high)


def default_delta(num_samples: int) -> float:
    """δ = 1 / (10 n) for n privacy units (users or interactions).

    A δ of 1/n would allow a mechanism that publishes one unit's data outright
    with probability 1/n; the usual rule asks for δ well below 1/n, and a
    factor of 10 keeps it strictly below.
    """
    if not _is_integer(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer (the number of privacy units); got {num_samples!r}.")
    return 1.0 / (10 * int(num_samples))


# ---------------------------------------------------------------- independent accountant (no Opacus)


def _log_add(log_x: float, log_y: float) -> float:
    """log(exp(log_x) + exp(log_y))."""
    low, high = min(log_x, log_y), max(log_x, log_y)
    if low == -math.inf:
        return high
    return high + math.log1p(math.exp(low - high))


def _log_sub(log_x: float, log_y: float) -> float:
    """log(exp(log_x) - exp(log_y)) for log_x >= log_y."""
    if log_y == -math.inf:
        return log_x
    if log_y >= log_x:
        return -math.inf
    return log_x + math.log(-math.expm1(log_y - log_x))


def _log_erfc(x: float) -> float:
    """log(erfc(x)), accurate where erfc(x) underflows (x above ~26)."""
    if x < 25.0:
        return math.log(math.erfc(x))
    # Asymptotic series erfc(x) = exp(-x²) / (x √π) · Σ (-1)^n (2n-1)!! / (2x²)^n; at x >= 25
    # its terms shrink by a factor of at least 300 each, so ten terms are exact to double precision.
    inverse = 1.0 / (2.0 * x * x)
    term, total = 1.0, 1.0
    for n in range(1, 10):
        term *= -(2 * n - 1) * inverse
        total += term
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log(total)


def _log_a_integer_order(q: float, sigma: float, order: int) -> float:
    """log A_α for integer α: a finite binomial sum (Mironov et al. 2019, Section 3.3)."""
    log_a = -math.inf
    for i in range(order + 1):
        log_term = (
            math.log(math.comb(order, i))
            + i * math.log(q)
            + (order - i) * math.log1p(-q)
            + (i * i - i) / (2 * sigma**2)
        )
        log_a = _log_add(log_a, log_term)
    return log_a


def _log_a_fractional_order(q: float, sigma: float, order: float) -> float:
    """log A_α for fractional α: the two erfc series of Mironov et al. 2019, Section 3.3.

    Positive and negative terms (the binomial coefficients alternate in sign once
    i > α) are summed apart in log space and subtracted once at the end.
    """
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    positive, negative = -math.inf, -math.inf
    log_coef, sign = 0.0, 1.0  # log |binom(α, i)| and its sign, updated term by term
    i = 0
    while True:
        j = order - i
        log_s0 = (
            log_coef
            + i * log_q
            + j * log_1mq
            + (i * i - i) / (2 * sigma**2)
            + math.log(0.5)
            + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        )
        log_s1 = (
            log_coef
            + j * log_q
            + i * log_1mq
            + (j * j - j) / (2 * sigma**2)
            + math.log(0.5)
            + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        )
        term = _log_add(log_s0, log_s1)
        if sign > 0:
            positive = _log_add(positive, term)
        else:
            negative = _log_add(negative, term)
        if i > order and max(log_s0, log_s1) < _NEGLIGIBLE_LOG_TERM:
            break
        factor = order - i  # binom(α, i+1) = binom(α, i) · (α - i) / (i + 1)
        log_coef += math.log(abs(factor)) - math.log(i + 1)
        sign *= 1.0 if factor > 0 else -1.0
        i += 1
    return _log_sub(positive, negative)


def rdp_of_sampled_gaussian(*, noise_multiplier: float, sample_rate: float, order: float) -> float:
    """RDP at `order` of one step of the sampled Gaussian mechanism (sensitivity 1)."""
    if sample_rate == 1.0:  # no subsampling: the Gaussian mechanism, α / (2σ²)
        return order / (2 * noise_multiplier**2)
    if float(order).is_integer():
        log_a = _log_a_integer_order(sample_rate, noise_multiplier, int(order))
    else:
        log_a = _log_a_fractional_order(sample_rate, noise_multiplier, order)
    return log_a / (order - 1)


def epsilon_from_rdp(*, orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """(ε, best order): the RDP to (ε, δ) conversion of Balle et al. 2020, Theorem 21, minimised over orders."""
    best = (math.inf, math.nan)
    for order, value in zip(orders, rdp, strict=True):
        epsilon = value - (math.log(delta) + math.log(order)) / (order - 1) + math.log((order - 1) / order)
        if epsilon < best[0]:
            best = (epsilon, order)
    return best


def independent_epsilon(
    *, history: Iterable[Sequence[Any]], delta: float, orders: Sequence[float] | None = None
) -> float:
    """ε of a composed history, computed without Opacus.

    RDP composes by addition over steps and entries; the total is converted to
    (ε, δ) at the best order. A history of (noise_multiplier, sample_rate, steps)
    triples is accounted for at Opacus's orders (`orders`, default DEFAULT_ORDERS)
    and agrees with Opacus's RDPAccountant to about 1e-9 relative. A history with
    a Skellam entry is accounted for by `skellam.skellam_epsilon` at integer orders
    (default 2..256), the same computation as the client's.
    """
    checked = checked_history(list(history))
    delta = check_delta(delta)
    if not checked:
        return 0.0
    if has_skellam(checked):
        from fedtower.privacy.skellam import SKELLAM_ORDERS, skellam_epsilon

        return skellam_epsilon(history=checked, delta=delta, orders=SKELLAM_ORDERS if orders is None else orders)
    orders = tuple(float(order) for order in (DEFAULT_ORDERS if orders is None else orders))
    total = [0.0] * len(orders)
    for noise_multiplier, sample_rate, steps in checked:
        per_step = _rdp_per_step(noise_multiplier, sample_rate, orders)
        total = [value + steps * step_value for value, step_value in zip(total, per_step, strict=True)]
    return float(epsilon_from_rdp(orders=orders, rdp=total, delta=delta)[0])


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(noise_multiplier: float, sample_rate: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    """One step's RDP at every order; cached, since an audit recomputes the same parameters on every line."""
    return tuple(
        rdp_of_sampled_gaussian(noise_multiplier=noise_multiplier, sample_rate=sample_rate, order=order)
        for order in orders
    )
