"""Facts about the provider's images API that the client, the manifest and the emulator share.

Everything here comes from ``shared/API.md``: the models, the price, the 30 sizes, the fields the
provider rejects, the error codes that stop a run, what its rate-limit headers can announce, and
how to tell an image format by its bytes. Data only: no I/O, and no import from the rest of the
runner, so that :mod:`runner.errors` can build on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

MICRO: Final = 1_000_000  # money is kept in integer micro-dollars, so sums are exact
PRICE_PER_IMAGE_MICRO_USD: Final = 30_000  # $0.03
PRICE_PER_IMAGE_USD: Final = PRICE_PER_IMAGE_MICRO_USD / MICRO

MODELS: Final = ("gpt-image-2-vip", "gpt-image-2-all")
DEFAULT_MODEL: Final = "gpt-image-2-vip"
# gpt-image-2-all is "the same call, no size field".
MODELS_WITHOUT_SIZE: Final = frozenset({"gpt-image-2-all"})

Endpoint = Literal["generations", "edits"]
ResponseFormat = Literal["url", "b64_json"]
RESPONSE_FORMATS: Final = ("url", "b64_json")
DEFAULT_RESPONSE_FORMAT: Final = {"generations": "url", "edits": "b64_json"}

# Sending any of these is rejected by the provider; n=3 is even billed three times.
REJECTED_FIELDS: Final = ("n", "quality", "aspect_ratio")

# 10 ratios x (1K fast, 2K recommended, 4K detail), WIDTHxHEIGHT with a lowercase ASCII x.
SIZES: Final = (
    "1280x1280", "848x1280", "1280x848", "960x1280", "1280x960",
    "1024x1280", "1280x1024", "720x1280", "1280x720", "1280x544",
    "2048x2048", "1360x2048", "2048x1360", "1536x2048", "2048x1536",
    "1632x2048", "2048x1632", "1152x2048", "2048x1152", "2048x864",
    "2880x2880", "2336x3520", "3520x2336", "2480x3312", "3312x2480",
    "2560x3216", "3216x2560", "2160x3840", "3840x2160", "3840x1632",
)  # fmt: skip
SIZE_SET: Final = frozenset(SIZES)
AUTO_SIZE: Final = "auto"

REFERENCE_MAX_BYTES: Final = 10 * 1024 * 1024

# 429 codes that no amount of waiting clears: the account is out of money or over a hard limit.
SPEND_LIMIT_CODES: Final = frozenset(
    {
        "insufficient_quota",
        "billing_hard_limit_reached",
        "billing_not_active",
        "quota_exceeded",
        "spend_limit_reached",
    }
)


@dataclass(frozen=True)
class RateLimitHeaders:
    """What an answer's ``x-ratelimit-*-requests`` headers announce (parsed by
    :func:`runner.http.headers.rate_limit_headers`); an error carries them to the pacer."""

    limit_rpm: float | None = None
    remaining: int | None = None
    reset_s: float | None = None


ImageFormat = Literal["png", "jpeg", "webp"]
EXTENSIONS: Final[dict[str, str]] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
MIME_TYPES: Final[dict[str, str]] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def parse_size(size: str) -> tuple[int, int]:
    """``"2048x1360"`` -> ``(2048, 1360)``; only for members of :data:`SIZES`."""
    width, height = size.split("x")
    return int(width), int(height)


def sniff_format(head: bytes) -> ImageFormat | None:
    """The image format from the first bytes of a file, or None if it is not png, jpeg or webp."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None
