"""The emulator's pictures: the PNGs it renders, the sizes it picks, the usage it reports.

It owns reading the dimensions of uploaded references, choosing the edit target and the closest
of the 30 sizes for ``size=auto``, rendering a PNG of exactly the requested size, and the token
usage numbers an edits reply carries.

Two kinds of picture (``EmulatorConfig.payload``): ``"flat"``, two colours taken from the prompt,
a few KB even at 4K; and ``"noise"``, random pixels that no encoder can shrink, as big as a real
provider's images (a 3840x2160 PNG is ~25 MB, ~33 MB as base64). Noise costs ~0.7 s to render at
4K, so each size is rendered once and its PNG and base64 kept for every later request.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import math
import random
import re

from PIL import Image, ImageDraw

from runner.emulator.errors import ErrorReply
from runner.provider import SIZES, parse_size, sniff_format

_IMAGE_REF = re.compile(r"\bimage(\d+)\b", re.IGNORECASE)


def image_dimensions(data: bytes) -> tuple[int, int]:
    if sniff_format(data[:16]) is None:
        message = "Unsupported image format; upload png, jpeg or webp."
        raise ErrorReply(400, message, "image", "invalid_image_format")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ErrorReply(400, f"Unreadable image: {exc}", "image", "invalid_image") from exc


def size_label(data: bytes) -> str:
    try:
        width, height = image_dimensions(data)
    except ErrorReply:
        return "invalid"
    return f"{width}x{height}"


def edit_target(prompt: str, image_count: int) -> int:
    """Index of the image the prompt edits: the first ``imageN`` it names, else image1."""
    match = _IMAGE_REF.search(prompt)
    if match is None or not 1 <= int(match.group(1)) <= image_count:
        return 0
    return int(match.group(1)) - 1


def closest_size(width: int, height: int) -> str:
    """The size with the nearest aspect ratio; among the tiers of that ratio, the nearest area."""

    def ratio_distance(size: str) -> float:
        w, h = parse_size(size)
        return abs(math.log((w / h) / (width / height)))

    best = min(ratio_distance(size) for size in SIZES)
    # The 4K sizes' ratios differ from the 1K ones in the third decimal: same ratio, other tier.
    candidates = [size for size in SIZES if ratio_distance(size) <= best + 0.01]
    return min(candidates, key=lambda s: abs(math.log(math.prod(parse_size(s)) / width / height)))


def colour_of(prompt: str) -> tuple[int, int, int]:
    digest = hashlib.sha256(prompt.encode()).digest()
    return digest[0], digest[1], digest[2]


@functools.lru_cache(maxsize=32)
def render_png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    # A two-colour palette image encodes a 4K frame in ~15 ms; RGB would take ~100 ms.
    image = Image.new("P", (width, height), 0)
    image.putpalette([*colour, *(255 - c for c in colour)])
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 8, height // 8, width // 3, height // 3), fill=1)
    outline = (width // 2, height // 2, width * 7 // 8, height * 7 // 8)
    draw.rectangle(outline, outline=1, width=max(2, width // 200))
    draw.text((16, 16), f"{width}x{height}", fill=1)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@functools.lru_cache(maxsize=4)  # 4 sizes x (25 MB PNG + 33 MB base64) at 4K
def noise_png_b64(width: int, height: int) -> tuple[bytes, bytes]:
    """A PNG of random pixels, and its base64: the same for every request of that size."""
    pixels = random.Random(width * 100_000 + height).randbytes(width * height * 3)
    buffer = io.BytesIO()
    # Noise does not compress anyway; level 0 only stores it, twice as fast as level 1.
    Image.frombytes("RGB", (width, height), pixels).save(buffer, format="PNG", compress_level=0)
    png = buffer.getvalue()
    return png, base64.b64encode(png)


def edit_usage(prompt: str, image_count: int, width: int, height: int) -> dict[str, int]:
    input_tokens = 20 + len(prompt) // 4 + 272 * image_count
    output_tokens = width * height // 1400
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }
