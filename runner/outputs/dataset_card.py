"""The dataset card of an export: ``DEST/README.md``, as the Hugging Face Hub reads one.

Its YAML front matter carries what the Hub indexes (``license``, left for the user to fill in
with ``other`` until then; ``task_categories``, ``tags``, ``size_categories``) and a ``configs``
entry naming each split's files, which is what lets ``datasets.load_dataset(DEST)`` (and the
Hub's viewer) load splits of any name, and keeps the ``references/`` folder out of them. The
body says what a user of the dataset asks first: how many images in each split, of which sizes,
from which model and prompt templates (with their variables' values), what they cost, when and
how they were made, and what each column means.

It is written from a :class:`CardTally` of the exported rows, filled while they are written,
and the export's facts (:class:`CardFacts`); it reads nothing itself.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from runner.outputs.export_columns import FIXED_COLUMNS, Columns, Value
from runner.provider import MICRO
from runner.store.views import ExportJob, Spend
from runner.words import plural

VALUES_SHOWN: Final = 20  # of a variable, in the card; the columns hold them all

_COLUMN_NOTES: Final = {
    "file_name": "the image's file name (imagefolder: the `image` column)",
    "prompt": "the prompt sent (a template's variables filled in)",
    "size": 'the size asked for; "" when the provider chose, "auto" when an edit followed '
    "its reference",
    "width": "the image's width in pixels",
    "height": "the image's height in pixels",
    "model": "the model that made it",
    "job_id": "the job's id in the image-runner output folder",
    "references": "an edit's reference images, paths from the dataset's root joined with \"|\"",
    "sha256": "the sha256 of the image file",
    "repeat": "which copy of a prompt with `repeat` (1, 2...); 0 for a prompt without",
    "version": "the image's generation: 1, then 2 after a regeneration...",
    "review": "approved, rejected or unreviewed (image-runner review)",
}


@dataclass
class CardTally:
    """What the card counts, of the rows exported."""

    sizes: Counter[tuple[int, int]] = field(default_factory=Counter)
    models: Counter[str] = field(default_factory=Counter)
    reviews: Counter[str] = field(default_factory=Counter)
    untemplated: int = 0  # images of rows without a matrix
    templates: dict[str, int] = field(default_factory=dict)  # template -> images
    values: dict[str, dict[str, dict[Value, None]]] = field(default_factory=dict)  # ordered sets

    def add(self, job: ExportJob) -> None:
        self.sizes[job.width, job.height] += 1
        self.models[job.model] += 1
        self.reviews[job.review] += 1
        if not job.template:
            self.untemplated += 1
            return
        self.templates[job.template] = self.templates.get(job.template, 0) + 1
        variables = self.values.setdefault(job.template, {})
        for name, value in job.vars.items():
            variables.setdefault(name, {})[value] = None


@dataclass(frozen=True)
class CardFacts:
    """What the card says besides the tally."""

    title: str
    output_folder: str
    fmt: str
    split_files: dict[str, tuple[int, str]]  # split -> (images, its files' pattern), in order
    references: int  # reference images copied
    skipped: int  # jobs not exported: image or reference missing or changed
    split_spec: str
    approved_only: bool
    exported_spend: Spend  # of the exported jobs' attempts, all versions
    folder_spend: Spend  # everything the output folder recorded
    version: str  # image-runner's
    command: str
    exported_at: str  # ISO 8601, UTC


def render_card(facts: CardFacts, tally: CardTally, columns: Columns) -> str:
    images = sum(count for count, _ in facts.split_files.values())
    return "\n".join(
        [
            *_front_matter(facts, images),
            f"# {_heading(facts.title)}",
            "",
            f"{images} images generated with image-runner from the output folder "
            f"`{_code(facts.output_folder)}`, exported as {facts.fmt} on {facts.exported_at[:10]}.",
            "",
            "## Splits",
            "",
            "| split | images | files |",
            "|---|---:|---|",
            *(f"| {s} | {n} | `{p}` |" for s, (n, p) in facts.split_files.items()),
            "",
            f"Split by a hash of the job id ({facts.split_spec}): a job stays in its split on "
            "every export with the same split.",
            "",
            *_contents(facts, tally),
            *_templates(tally),
            *_columns(columns),
            "## Cost",
            "",
            f"The exported images: {_usd(facts.exported_spend.confirmed_micro_usd)} confirmed, "
            f"{_usd(facts.exported_spend.possible_micro_usd)} possible (requests whose charge "
            "was not confirmed), over all their attempts.",
            f"The whole output folder: {_usd(facts.folder_spend.confirmed_micro_usd)} confirmed, "
            f"{_usd(facts.folder_spend.possible_micro_usd)} possible.",
            "",
            "## How it was made",
            "",
            f"- image-runner {facts.version}, exported {facts.exported_at} (UTC)",
            f"- command: `{_code(facts.command)}`",
            "- only approved images" if facts.approved_only else "- every intact image",
            "",
            "## License",
            "",
            "Fill in the `license` field above (an identifier like `cc-by-4.0`, or `other` with "
            "`license_name` and `license_link`), within what the image provider's terms allow.",
            "",
        ]
    )


def _front_matter(facts: CardFacts, images: int) -> list[str]:
    configs = [
        f"  - split: {split}\n    path: {json.dumps(pattern)}"
        for split, (_, pattern) in facts.split_files.items()
    ]
    return [
        "---",
        "license: other  # fill in: the license these images are released under",
        f"pretty_name: {json.dumps(facts.title)}",
        "task_categories:",
        "- text-to-image",
        "tags:",
        "- image-runner",
        "- synthetic",
        "size_categories:",
        f"- {_size_category(images)}",
        "configs:",
        "- config_name: default",
        "  data_files:",
        *configs,
        "---",
        "",
    ]


def _contents(facts: CardFacts, tally: CardTally) -> list[str]:
    lines = ["## Images", "", "| width x height | images |", "|---|---:|"]
    lines += [f"| {w}x{h} | {n} |" for (w, h), n in sorted(tally.sizes.items())]
    lines += ["", "| model | images |", "|---|---:|"]
    lines += [f"| {_cell(model)} | {n} |" for model, n in tally.models.most_common()]
    reviews = ", ".join(f"{n} {review}" for review, n in sorted(tally.reviews.items()))
    lines += ["", f"Reviews: {reviews}."]
    if facts.references:
        lines.append(
            f"Edits: {facts.references} reference images in `references/` (each file once), "
            "named in the `references` column."
        )
    if facts.skipped:
        lines.append(
            f"{facts.skipped} finished jobs were left out: their image or a reference image "
            "was missing or had changed since the run."
        )
    return [*lines, ""]


def _templates(tally: CardTally) -> list[str]:
    if not tally.templates:
        return []
    lines = ["## Prompt templates", ""]
    for template, count in tally.templates.items():
        lines.append(f"- `{_code(template)}`: {plural(count, 'image')}")
        for name, values in tally.values.get(template, {}).items():
            shown = [f"`{_code(str(v))}`" for v in list(values)[:VALUES_SHOWN]]
            more = len(values) - len(shown)
            text = ", ".join(shown) + (f" and {more} more" if more else "")
            lines.append(f"  - `{_code(name)}`: {text}")
    if tally.untemplated:
        lines.append(f"- no template (a prompt of its own): {plural(tally.untemplated, 'image')}")
    return [*lines, ""]


def _columns(columns: Columns) -> list[str]:
    lines = ["## Columns", "", "| column | type | what |", "|---|---|---|"]
    variable_of = {column: name for name, column in columns.variables.items()}
    for column, kind in columns.types.items():
        if column in FIXED_COLUMNS:
            note = _COLUMN_NOTES[column]
        else:
            note = f"the template variable `{variable_of[column]}`"
            if kind == "string":
                note += ' ("" for a job without it)'
        lines.append(f"| {column} | {kind} | {_cell(note)} |")
    return [*lines, ""]


def _size_category(images: int) -> str:
    """The Hub's ``size_categories`` value for ``images`` rows."""
    bounds = (("1K", 10**3), ("10K", 10**4), ("100K", 10**5), ("1M", 10**6), ("10M", 10**7))
    lower = "n"
    for label, bound in bounds:
        if images < bound:
            return f"n<{label}" if lower == "n" else f"{lower}<n<{label}"
        lower = label
    return "10M<n<100M"


def _usd(micro_usd: int) -> str:
    return f"${micro_usd / MICRO:.2f}"


def _cell(text: str) -> str:
    """``text`` on one line, safe in a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _heading(text: str) -> str:
    """``text`` (the dataset folder's name) as a heading's plain text: on one line, so it
    starts nothing else, and with its HTML escaped."""
    return html.escape(" ".join(text.split()), quote=False)


def _code(text: str) -> str:
    """``text`` on one line, safe in a Markdown code span."""
    return " ".join(text.split()).replace("`", "'")
