"""How the emulator behaves: :class:`EmulatorConfig`, checked when it is made.

The defaults answer every valid request at once, correctly; each setting adds one kind of
trouble a real provider makes (latency, faults, a rate limit, answers as big as real ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from runner.emulator.faults import DEFAULT_FAULT_MIX, FAULT_KINDS, NO_FAULT


@dataclass(frozen=True)
class EmulatorConfig:
    """How the emulator behaves; the defaults answer every valid request at once, correctly."""

    latency_s: float = 0.0  # before every API response
    latency_jitter_s: float = 0.0  # plus uniform(0, jitter)
    fault_rate: float = 0.0  # share of requests that draw a random fault from fault_kinds
    fault_kinds: tuple[str, ...] = DEFAULT_FAULT_MIX
    seed: int | None = None  # makes the random faults and jitter reproducible
    retry_after_s: float = 0.05  # the Retry-After of injected 429 and 503
    slow_s: float = 2.0  # how long "slow" holds a billed answer back
    api_key: str | None = None  # None: any Bearer key is accepted
    b64_prefix: bool = True  # the provider's "data:image/png;base64,"; False: plain OpenAI
    cdn_ttl_s: float = 3600
    script: tuple[str, ...] = ()  # faults for the 1st, 2nd, ... valid request; "ok" for none
    payload: Literal["flat", "noise"] = "flat"  # noise: incompressible, ~25 MB at 3840x2160
    # A token bucket checked when a request arrives (before the latency); refusals are 429s.
    rate_limit_rpm: float | None = None  # None: no limit
    rate_limit_burst: int = 10  # the bucket's size
    rate_limit_headers: bool = False  # False: the 429 says nothing about when to come back
    rate_limit_scope: Literal["shared", "per_endpoint"] = "shared"  # one bucket, or one each

    def __post_init__(self) -> None:
        for name in ("latency_s", "latency_jitter_s", "retry_after_s", "slow_s", "cdn_ttl_s"):
            _check_number(name, getattr(self, name))
        _check_number("fault_rate", self.fault_rate)
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"seed must be a whole number or None, got {self.seed!r}")
        if self.rate_limit_rpm is not None:
            _check_number("rate_limit_rpm", self.rate_limit_rpm)
        _check_number("rate_limit_burst", self.rate_limit_burst, integer=True)
        unknown = [k for k in self.fault_kinds if k not in FAULT_KINDS]
        unknown += [k for k in self.script if k not in FAULT_KINDS and k != NO_FAULT]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be within [0, 1], got {self.fault_rate}")
        if self.fault_rate > 0 and not self.fault_kinds:
            raise ValueError("fault_rate > 0 needs at least one fault kind")
        if self.payload not in ("flat", "noise"):
            raise ValueError(f"payload must be flat or noise, got {self.payload!r}")
        if self.rate_limit_rpm is not None and self.rate_limit_rpm <= 0:
            raise ValueError(f"rate_limit_rpm must be more than 0, got {self.rate_limit_rpm}")
        if self.rate_limit_burst < 1:
            raise ValueError(f"rate_limit_burst must be at least 1, got {self.rate_limit_burst}")
        if self.rate_limit_headers and self.rate_limit_rpm is None:
            raise ValueError("rate_limit_headers announces a limit: set rate_limit_rpm too")
        if self.rate_limit_scope not in ("shared", "per_endpoint"):
            raise ValueError(
                f"rate_limit_scope must be shared or per_endpoint, got {self.rate_limit_scope!r}"
            )


def _check_number(name: str, value: object, *, integer: bool = False) -> None:
    """A number (not a bool, not NaN) at least 0: the ranges are checked after."""
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if not value >= 0:  # NaN too
        raise ValueError(f"{name} must be at least 0, got {value!r}")
