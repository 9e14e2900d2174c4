"""Prompt matrices and repeats: one manifest row that stands for many jobs.

A YAML job may carry ``vars`` (a mapping of names to lists) and a ``prompt`` template naming
them (``"A {style} photo of a {subject}"``); the row stands for the cross product of the lists,
in the order the names are given. ``repeat: N`` asks for N images of each prompt, each its own
job. Expansion happens at validation time, so ``validate`` and ``--dry-run`` count and price the
expanded jobs before anything is sent.

Ids stay readable and stable: a row with ``id: portrait`` expands to ``portrait-watercolor-cat``,
``portrait-watercolor-cat-2`` and so on (the values, slugged, then the repeat number); a row
without an id gets content-derived ids as usual, the repeat number being part of the content.
Adding a value to a list or raising ``repeat`` keeps every existing id.
"""

from __future__ import annotations

import itertools
import math
import re
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

MAX_EXPANSION = 100_000
MAX_REPEAT = 10_000


@dataclass(frozen=True)
class Variant:
    prompt: str
    id_suffix: str  # appended to an explicit id: "watercolor-cat", "watercolor-cat-2"
    label: str  # for messages: "style=watercolor subject=cat #2"
    repeat_index: int | None  # part of the content hash when the row has ``repeat``
    values: tuple[tuple[str, str | int | float], ...]  # each variable's value, as given


def check(vars_: object, repeat: object, template: str) -> list[tuple[str, str]]:
    """Problems as ``(field, message)``; an empty list means :func:`expand` is safe."""
    problems: list[tuple[str, str]] = []
    if repeat is not None and (
        not isinstance(repeat, int) or isinstance(repeat, bool) or not 1 <= repeat <= MAX_REPEAT
    ):
        problems.append(("repeat", f"must be a whole number from 1 to {MAX_REPEAT}"))
    if vars_ is None:
        return problems
    if not isinstance(vars_, Mapping) or not vars_:
        return [*problems, ("vars", "must be a mapping of names to lists of values")]
    for name, values in vars_.items():
        if not isinstance(name, str) or not name.isidentifier():
            problems.append(("vars", f"{name!r} is not a usable name (letters, digits, _)"))
        elif not isinstance(values, list) or not values:
            problems.append((f"vars.{name}", "must be a non-empty list"))
        elif not all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in values):
            problems.append((f"vars.{name}", "values must be text or numbers"))
    try:
        fields = _template_fields(template)
    except ValueError as exc:
        return [*problems, ("prompt", f"is not a valid template: {exc}")]
    for name in fields - set(vars_):
        problems.append(("prompt", f"uses {{{name}}}, which vars does not define"))
    for name in set(vars_) - fields:
        problems.append((f"vars.{name}", "is not used in the prompt"))
    if not problems:
        copies = repeat if isinstance(repeat, int) else 1
        count = math.prod(len(v) for v in vars_.values()) * copies
        if count > MAX_EXPANSION:
            problems.append(("vars", f"expands to {count} jobs, over the {MAX_EXPANSION} limit"))
    return problems


def expand(
    template: str, vars_: Mapping[str, list[str | int | float]] | None, repeat: int | None
) -> Iterator[Variant]:
    """The jobs a checked row stands for, in order."""
    names = [str(name) for name in vars_ or {}]
    value_lists = [list(map(_plain, vars_[name])) for name in names] if vars_ else [[]]
    combos = itertools.product(*value_lists) if vars_ else [()]
    for combo in combos:
        values = dict(zip(names, combo, strict=True))
        prompt = template.format_map({k: str(v) for k, v in values.items()}) if vars_ else template
        slug = "-".join(_slug(v, i) for i, v in enumerate(combo))
        pairs = " ".join(f"{k}={v}" for k, v in values.items())
        for index in range(1, (repeat or 1) + 1):
            suffix = slug if repeat is None else "-".join(filter(None, [slug, str(index)]))
            label = pairs if repeat is None else " ".join(filter(None, [pairs, f"#{index}"]))
            copy = index if repeat is not None else None
            yield Variant(prompt, suffix, label, copy, tuple(values.items()))


def _plain(value: str | int | float) -> str | int | float:
    """``value`` as a plain str, int or float: a numpy float or str (from a DataFrame) is a
    subclass, which formats and slugs the same but does not pack into the spool."""
    if isinstance(value, str):
        return str(value)
    return int(value) if isinstance(value, int) else float(value)


def _template_fields(template: str) -> set[str]:
    fields: set[str] = set()
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"{{{name}}} must be a plain name, like {{style}}")
        fields.add(name)
    return fields


def _slug(value: object, position: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", str(value).lower()).strip("-")
    return slug[:40].strip("-") or f"v{position + 1}"
