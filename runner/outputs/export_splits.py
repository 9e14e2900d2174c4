"""Dataset splits by a hash of the job id: ``export --split train=0.9,test=0.1``.

A job's split depends on its id and the spec alone: the sha256 of the id, read as a number in
[0, 1), falls into one of the ranges the fractions cut, in the order the spec names them. So
the same job lands in the same split on every export with the same spec, whatever else the run
holds: jobs added, regenerated, rejected or skipped never move another job. (A different spec,
even the same fractions in another order, is another assignment.)

Names must be usable as split names by Hugging Face ``datasets`` (identifiers: letters, digits
and ``_``). The ``imagefolder`` layout writes a folder per split, and
``load_dataset("imagefolder", data_dir=DEST)`` names a split after its folder only for
``train``, ``validation`` and ``test`` (it reads ``val`` or ``dev`` as ``validation``, and a
folder with another name not as a split at all), so that format takes those three names;
``parquet`` takes any identifier (its file names carry the split, which ``datasets`` reads
whatever it is).
"""

from __future__ import annotations

import hashlib
import keyword
import math
from dataclasses import dataclass
from typing import Final

# The split names load_dataset("imagefolder", data_dir=...) keeps as they are.
IMAGEFOLDER_SPLITS: Final = ("train", "validation", "test")
# Folder names of the layout that a split's folder must not take.
RESERVED_NAMES: Final = frozenset({"references", "data"})


@dataclass(frozen=True)
class SplitSpec:
    """Split names and the fractions of the jobs they take, in the order given."""

    fractions: tuple[tuple[str, float], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fractions)

    def split_of(self, job_id: str) -> str:
        """The split ``job_id`` belongs to: always the same for the same id and spec."""
        point = int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8]) / 2**64
        bound = 0.0
        for name, fraction in self.fractions:
            bound += fraction
            if point < bound:
                return name
        return self.fractions[-1][0]  # the fractions' sum may fall a rounding short of 1

    def __str__(self) -> str:
        return ",".join(f"{name}={fraction:g}" for name, fraction in self.fractions)


TRAIN_ONLY: Final = SplitSpec((("train", 1.0),))


def parse_split(text: str) -> SplitSpec:
    """``"train=0.9,test=0.1"`` as a :class:`SplitSpec`; ``ValueError`` saying what is wrong
    and what to write instead."""
    fractions: list[tuple[str, float]] = []
    for part in (p.strip() for p in text.split(",")):
        name, equals, value = (s.strip() for s in part.partition("="))
        if not equals or not name or not value:
            raise ValueError(f"{part!r} is not NAME=FRACTION; write e.g. train=0.9,test=0.1")
        if not name.isidentifier() or keyword.iskeyword(name) or not name.isascii():
            raise ValueError(f"split name {name!r} must be a name of letters, digits and _")
        if name in RESERVED_NAMES:
            raise ValueError(f"split name {name!r} is taken by the dataset's own {name}/ folder")
        if name in dict(fractions):
            raise ValueError(f"split {name!r} is named twice")
        try:
            fraction = float(value)
        except ValueError:
            raise ValueError(f"the fraction of {name!r}, {value!r}, is not a number") from None
        if not 0 < fraction <= 1 or not math.isfinite(fraction):
            raise ValueError(f"the fraction of {name!r} must be more than 0 and at most 1")
        fractions.append((name, fraction))
    total = math.fsum(f for _, f in fractions)
    if abs(total - 1) > 1e-9:
        raise ValueError(f"the fractions add up to {total:g}; they must add up to 1")
    return SplitSpec(tuple(fractions))


def imagefolder_problem(spec: SplitSpec) -> str | None:
    """Why ``spec`` does not suit the imagefolder layout, if it does not."""
    odd = [name for name in spec.names if name not in IMAGEFOLDER_SPLITS]
    if not odd:
        return None
    return (
        f"split {', '.join(map(repr, odd))}: the imagefolder format takes the split names "
        f"{', '.join(IMAGEFOLDER_SPLITS)} (datasets reads other folder names otherwise or "
        "not at all); rename it, or export with --format parquet, which takes any name"
    )
