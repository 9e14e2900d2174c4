"""The bare client of the overhead figures: the least any client must do for each image.

``python -m bench.bare BASE_URL --jobs N --concurrency C --size WxH [--write DIR]`` sends N
generations with C in flight on one aiohttp session, and for each reads the body, decodes the
JSON and the base64 and throws the image away: no checkpoint, no verification, no file. With
``--write DIR`` it also writes each image to its own file in DIR (a plain write, no fsync): for
4K images writing 25 MB is part of the least any client must do. The runner's throughput over
this loop's, against the same emulator, is what the runner's own work costs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import aiohttp

from bench.manifests import PROMPT

MODEL = "gpt-image-2-vip"


async def fetch_all(
    base_url: str, *, jobs: int, concurrency: int, size: str, write_dir: Path | None = None
) -> int:
    """Send the ``jobs`` requests; return how many brought an image. With ``write_dir``, each
    image is written there as ``<n>.png`` (in a thread, as any client would off its loop)."""
    body = {"model": MODEL, "prompt": PROMPT, "size": size, "response_format": "b64_json"}
    headers = {"Authorization": f"Bearer {os.environ.get('IMAGE_RUNNER_API_KEY', 'bench')}"}
    url = f"{base_url}/images/generations"
    pending: Iterator[int] = iter(range(jobs))
    images = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal images
        for index in pending:  # one iterator shared by the workers: each job is taken once
            async with session.post(url, json=body) as response:
                data = await response.read()
            if response.status != 200:
                continue
            b64 = json.loads(data)["data"][0]["b64_json"]
            image = base64.b64decode(b64.partition(",")[2] if b64.startswith("data:") else b64)
            if write_dir is not None:
                await asyncio.to_thread((write_dir / f"{index}.png").write_bytes, image)
            images += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return images


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__)
    parser.add_argument("base_url")
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--size", required=True)
    parser.add_argument("--write", type=Path, metavar="DIR", help="also write each image there")
    args = parser.parse_args(argv)
    if args.write is not None:
        args.write.mkdir(parents=True, exist_ok=True)
    images = asyncio.run(
        fetch_all(
            args.base_url,
            jobs=args.jobs,
            concurrency=args.concurrency,
            size=args.size,
            write_dir=args.write,
        )
    )
    print(f"{images} of {args.jobs} images")
    return 0 if images == args.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
