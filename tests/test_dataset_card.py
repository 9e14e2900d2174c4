"""The dataset card as text: every value that comes from the user (the output folder's path, the
command line, a template's variables and their values) is shown as code, so no Markdown or HTML
in it renders. The card of a real export, loaded with ``datasets``: ``test_export_dataset.py``."""

from __future__ import annotations

from runner.outputs.dataset_card import CardFacts, CardTally, render_card
from runner.outputs.export_columns import Columns
from runner.store.views import ExportJob, Spend

HOSTILE = "`x` <img src=x onerror=alert(1)> **bold** [link](https://example.com) | a\nb"


def job(variables: dict[str, str | int | float]) -> ExportJob:
    return ExportJob(
        job_id="owl-1",
        prompt="a photo of an owl",
        size="1024x1024",
        model="gpt-image-1",
        references=(),
        image_path="images/owl-1.png",
        width=1024,
        height=1024,
        sha256="0" * 64,
        vars=variables,
        repeat_index=None,
        template="a {style} photo of an {subject}",
        version=1,
        review="unreviewed",
        edited=False,
        content_hash="1" * 64,
    )


def card_of(jobs: list[ExportJob], folder: str, command: str, title: str = "owls") -> str:
    tally = CardTally()
    for exported in jobs:
        tally.add(exported)
    facts = CardFacts(
        title=title,
        output_folder=folder,
        fmt="imagefolder",
        split_files={"train": (len(jobs), "train/**")},
        references=0,
        skipped=0,
        split_spec="train=1.0",
        approved_only=False,
        exported_spend=Spend(0, 0),
        folder_spend=Spend(0, 0),
        version="0.1.0",
        command=command,
        exported_at="2026-11-29T21:00:00+00:00",
    )
    return render_card(facts, tally, Columns(jobs))


def test_user_values_are_code_spans_that_nothing_closes() -> None:
    card = card_of(
        [job({"style": HOSTILE, "subject<b>": "owl"})],
        folder=f"/data/{HOSTILE}",
        command=f"image-runner export {HOSTILE}",
    )
    # On one line, each backtick of the value made a quote: the span holds it all.
    shown = "'x' <img src=x onerror=alert(1)> **bold** [link](https://example.com) | a b"
    assert f"output folder `/data/{shown}`, exported" in card
    assert f"- command: `image-runner export {shown}`" in card
    assert f"  - `style`: `{shown}`" in card
    assert "  - `subject<b>`: `owl`" in card


def test_a_variable_shows_its_first_values_then_a_count() -> None:
    jobs = [job({"seed": i}) for i in range(25)]
    card = card_of(jobs, folder="/data/out", command="image-runner export /data/out")
    (line,) = [line for line in card.splitlines() if line.startswith("  - `seed`")]
    assert line == "  - `seed`: " + ", ".join(f"`{i}`" for i in range(20)) + " and 5 more"


def test_the_title_is_one_line_of_plain_text() -> None:
    card = card_of([job({})], folder="/d", command="c", title="owls\n# injected <b>x</b>")
    assert "# owls # injected &lt;b&gt;x&lt;/b&gt;\n" in card
    assert "\n# injected" not in card
