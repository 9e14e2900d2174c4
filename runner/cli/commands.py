"""The commands besides ``run``: ``validate`` a manifest, serve the ``emulate``-d API, the
views of an output folder, ``report``, ``status`` and ``export``, and its ``review``.

Each takes its parsed arguments and returns an exit code. The views open the folder's
checkpoint read-only, so they are safe while a run is going on; a folder they cannot read
becomes an error message and exit 2, never a traceback. A run in object storage (``OUT`` a URL,
``--state`` its database) is viewed alike: ``report`` puts its page and thumbnails there,
``export`` and ``review`` read its images there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
from collections.abc import Iterator
from pathlib import Path

from runner.cli.parser import emulator_config_from
from runner.cli.printing import err
from runner.emulator import serve
from runner.errors import ManifestError, RunnerError
from runner.library import EXIT_INVALID, EXIT_OK
from runner.manifest import load_manifest
from runner.storage import is_remote, open_location
from runner.store import Store, open_read_only
from runner.words import plural, usd


def validate(args: argparse.Namespace) -> int:
    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as exc:
        err(str(exc))
        return EXIT_INVALID
    jobs, edits, rows = len(manifest), manifest.edits, manifest.rows
    expanded = f", from {plural(rows, 'manifest row')}" if rows != jobs else ""
    print(
        f"{args.manifest}: {plural(jobs, 'job')} ({plural(jobs - edits, 'generation')}, "
        f"{plural(edits, 'edit')}{expanded}), {usd(jobs)} at $0.03 an image, before retries"
    )
    return EXIT_OK


def emulate(args: argparse.Namespace) -> int:
    try:
        config = emulator_config_from(args)
    except ValueError as exc:
        err(f"error: {exc}")
        return EXIT_INVALID

    def ready(url: str) -> None:
        print(f"emulator listening on {url} (Ctrl-C to stop)", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, args.host, args.port, on_ready=ready))
    return EXIT_OK


def report(args: argparse.Namespace) -> int:
    from runner.core.remote_out import RemoteOut
    from runner.outputs.report import write_report

    with _reading(args.out, args.state) as store:
        if is_remote(args.out):
            with contextlib.closing(RemoteOut.open(args.out)) as remote:
                path: Path | str = remote.write_report(store)
        else:
            path = write_report(store)
    print(f"report: {path}")
    return EXIT_OK


def status(args: argparse.Namespace) -> int:
    from runner.outputs.status import format_status, read_status

    with _reading(args.out, args.state) as store:
        found = read_status(store)
    print(json.dumps(found.to_dict(), indent=2) if args.json else format_status(found))
    return EXIT_OK


def export(args: argparse.Namespace) -> int:
    from runner.outputs.export import export_dataset

    words = ["image-runner", "export", str(args.out), str(args.dest), "--format", args.format]
    words += ["--split", str(args.split)] + ["--approved-only"] * args.approved_only
    command = shlex.join(words)  # as the card tells it: rebuilt, whatever else argv held
    with _reading(args.out, args.state) as store:
        result = export_dataset(
            store,
            args.dest,
            args.format,
            split=args.split,
            approved_only=args.approved_only,
            command=command,
            location=open_location(args.out) if is_remote(args.out) else None,
        )
    for problem in result.reference_problems:
        err(f"left out: {problem}")
    notes = []
    if result.skipped:
        notes.append(f"{result.skipped} skipped: image missing or altered")
    if result.reference_problems:
        notes.append(f"{len(result.reference_problems)} skipped: reference missing or changed")
    skipped = f" ({'; '.join(notes)})" if notes else ""
    images = plural(result.images, "image")
    print(f"exported {images} as {args.format} to {result.dest}{skipped}")
    if len(result.splits) > 1:
        print("splits: " + ", ".join(f"{name} {n}" for name, n in result.splits.items()))
    if result.references:
        print(f"references: {plural(result.references, 'image')} in {result.dest / 'references'}")
    return EXIT_OK


def review(args: argparse.Namespace) -> int:
    """Serve the review app until Ctrl-C, or, given ``--approve`` / ``--reject``, write those
    decisions and exit. Neither takes the folder's lock: a run may be going on."""
    from runner.review import decide_ids, reviewer_name, serve_review
    from runner.review.launch import browser_opener
    from runner.store import open_review_log

    reviewer = reviewer_name(args.reviewer)
    if args.approve or args.reject:
        with contextlib.closing(open_review_log(args.out, args.state)) as log:
            decided = decide_ids(log, args.approve or (), args.reject or (), reviewer)
        for review in decided:
            print(f"{review.decision} {review.job_id} (version {review.version}) as {reviewer}")
        return EXIT_OK

    with browser_opener() as open_page:  # its redirect file removed once the app stops

        def ready(url: str) -> None:
            print(f"review: {url} (Ctrl-C to stop)", flush=True)
            if not args.no_browser:
                open_page(url)

        try:
            asyncio.run(
                serve_review(
                    args.out,
                    reviewer=reviewer,
                    port=args.port,
                    on_ready=ready,
                    state_url=args.state,
                )
            )
        except KeyboardInterrupt:
            print("review: stopped; every decision was saved as it was taken")
        except OSError as exc:
            raise RunnerError(
                f"cannot serve on 127.0.0.1:{args.port}: {exc.strerror or exc}; "
                "try another --port, or 0 for a free one"
            ) from None
    return EXIT_OK


def stop(args: argparse.Namespace) -> int:
    """Stop every worker of a run whose state is shared (``--state``): each finishes what it
    has in flight, within a few seconds; a later ``run`` of the manifest starts it again."""
    from runner.store import stop_run

    stop_run(args.out, args.state, args.reason)
    print(f"stop: every worker of {args.out} stops within a few seconds ({args.reason})")
    return EXIT_OK


@contextlib.contextmanager
def _reading(out: Path | str, state_url: str | None = None) -> Iterator[Store]:
    """The checkpoint of ``out``, for report, status and export. A folder they cannot read (a
    checkpoint of another version, a damaged one) or a file they cannot write becomes an error
    message and exit 2, through :func:`~runner.cli.main.main`, never a traceback."""
    try:
        with contextlib.closing(open_read_only(out, state_url)) as store:
            yield store
    except OSError as exc:
        raise RunnerError(f"{exc.filename or out}: {exc.strerror or exc}") from None
