"""How counts and money are worded for people, in one place, so that the CLI's summary, the
status view and the report agree: "1 request", "2 requests", "$0.09"."""

from __future__ import annotations

from runner.provider import MICRO, PRICE_PER_IMAGE_MICRO_USD


def plural(count: int, noun: str, plural_noun: str | None = None) -> str:
    """``count`` and ``noun``, the noun plural unless the count is 1: "1 job", "0 jobs"."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {plural_noun or noun + 's'}"


def usd(images: int) -> str:
    """What ``images`` images cost, as ``$0.09``."""
    return f"${images * PRICE_PER_IMAGE_MICRO_USD / MICRO:.2f}"
