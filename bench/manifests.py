"""Manifests of many jobs for the benchmarks, CSV or YAML, written line by line.

A million rows are streamed to disk rather than built in memory: the benchmark's own process
must stay small, because Linux counts the parent's memory into a child's ``ru_maxrss`` as the
child starts (its ``exec`` keeps the high-water mark of the memory it leaves), and the
children's peaks are what is measured.
Jobs run against the emulator share one prompt, so its image cache renders one picture per
size and the figures measure the runner, not the emulator's encoder; a manifest only validated
and planned gets distinct prompts, like a real one.
"""

from __future__ import annotations

from pathlib import Path

PROMPT = "a lighthouse on a cliff at dusk (benchmark)"  # no comma: a CSV cell as it is


def _prompt(index: int, distinct: bool) -> str:
    # Short, so a million rows stay well under the runner's 64 MB manifest limit.
    return f"lighthouse {index}" if distinct else PROMPT


def write_csv(path: Path, count: int, size: str, *, distinct_prompts: bool = False) -> Path:
    """``count`` generation jobs, ids ``j0000000``..., all of ``size``, as b64_json."""
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write("id,prompt,size,response_format\n")
        for i in range(count):
            f.write(f"j{i:07d},{_prompt(i, distinct_prompts)},{size},b64_json\n")
    return path


def write_yaml(path: Path, count: int, size: str, *, distinct_prompts: bool = False) -> Path:
    """The same jobs as :func:`write_csv`, as a YAML manifest with ``defaults``."""
    with path.open("w", encoding="utf-8") as f:
        f.write(f"defaults:\n  size: {size}\n  response_format: b64_json\njobs:\n")
        for i in range(count):
            f.write(f'  - id: j{i:07d}\n    prompt: "{_prompt(i, distinct_prompts)}"\n')
    return path
