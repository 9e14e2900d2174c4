"""Each failure class of RELIABILITY.md, injected by the emulator: how many attempts, which
ledger rows, what the job and the run end as. Faults are chosen per prompt with a
``[[faults:...]]`` directive, so the outcome does not depend on scheduling."""

from __future__ import annotations

import base64
import dataclasses
import io
from pathlib import Path

import pandas as pd
import pytest
from aiohttp import web
from PIL import Image

from runner.core.lifecycle import Run, RunReport
from runner.core.pool import Pool
from runner.core.retry import RetryConfig
from runner.emulator import Emulator
from runner.http.client import ClientConfig, ImageResult, ImagesClient
from runner.images.files import is_temp_name, temp_path_for
from runner.jobs import Job
from runner.manifest.load import load_manifest
from runner.store.sqlite import SqliteStore
from tests.conftest import (
    TEST_KEY,
    MakeEmulator,
    closed_port_url,
    db_rows,
    make_ref,
    run_manifest,
    serve_app,
    write_manifest,
)
from tests.conftest import options as _options


def one_job(tmp_path: Path, faults: str, **fields: str) -> Path:
    job = {"id": "job", "prompt": f"a lamp [[faults:{faults}]]", "size": "1280x544", **fields}
    return write_manifest(tmp_path, [job])


def ledger_billing(out: Path) -> list[str]:
    ledger = pd.read_csv(out / "ledger.csv").sort_values("attempt")
    return list(ledger["billing"])


def temp_files(out: Path) -> list[str]:
    """What an attempt left in the images folder besides finished images: nothing, ever."""
    return [p.name for p in (out / "images").iterdir() if is_temp_name(p.name)]


def job_row(out: Path) -> tuple[str, str | None, int]:
    status, cause, retryable = db_rows(
        out, "SELECT status, error_cause, retryable FROM jobs WHERE job_id = 'job'"
    )[0]
    return status, cause, retryable


@pytest.mark.parametrize(
    ("faults", "format_"),
    [
        ("429", "b64_json"),
        ("500", "b64_json"),
        ("502", "b64_json"),
        ("503", "url"),
        ("504", "b64_json"),
        ("400_retry", "b64_json"),
        ("503,429,500", "b64_json"),
    ],
)
async def test_answered_retryable_errors_are_retried_unbilled(
    tmp_path: Path, emulator: Emulator, faults: str, format_: str
) -> None:
    out = tmp_path / "out"
    report = await run_manifest(
        one_job(tmp_path, faults, response_format=format_), out, emulator.base_url
    )
    failures = len(faults.split(","))
    assert len(emulator.requests) == failures + 1
    assert report.ledger.totals.succeeded == 1
    assert ledger_billing(out) == ["confirmed"]
    assert db_rows(out, "SELECT COUNT(*) FROM attempts WHERE state = 'unbilled'") == [(failures,)]
    assert report.ledger.totals.confirmed_usd == emulator.billed_usd == 0.03


@pytest.mark.parametrize(
    ("faults", "billed_by_server"),
    [
        ("reset", True),
        ("truncate", True),
        ("malformed", True),
        ("badb64", True),
        ("slow", True),
        ("drop", False),
        ("empty200", True),
    ],
)
async def test_ambiguous_outcomes_are_possible_charges_then_retried(
    tmp_path: Path, make_emulator: MakeEmulator, faults: str, billed_by_server: bool
) -> None:
    emulator = await make_emulator(slow_s=1.0)
    out = tmp_path / "out"
    report = await run_manifest(one_job(tmp_path, faults), out, emulator.base_url, timeout_s=0.4)
    assert len(emulator.requests) == 2
    assert ledger_billing(out) == ["possible", "confirmed"]
    totals = report.ledger.totals
    assert (totals.confirmed_usd, totals.possible_usd) == (0.03, 0.03)
    assert emulator.billed_usd == (0.06 if billed_by_server else 0.03)
    assert temp_files(out) == []
    assert totals.confirmed_usd <= emulator.billed_usd <= totals.confirmed_usd + totals.possible_usd


async def test_a_url_that_serves_no_image_is_a_confirmed_charge(
    tmp_path: Path, emulator: Emulator
) -> None:
    # The API answered 200 with a url: it billed, whatever the CDN then serves.
    out = tmp_path / "out"
    report = await run_manifest(
        one_job(tmp_path, "badb64", response_format="url"), out, emulator.base_url
    )
    assert ledger_billing(out) == ["confirmed", "confirmed"]
    assert report.ledger.totals.confirmed_usd == emulator.billed_usd == 0.06


async def test_on_ambiguous_fail_records_and_stops_retrying(
    tmp_path: Path, emulator: Emulator
) -> None:
    out = tmp_path / "out"
    report = await run_manifest(
        one_job(tmp_path, "reset"), out, emulator.base_url, on_ambiguous="fail"
    )
    assert len(emulator.requests) == 1
    assert ledger_billing(out) == ["possible"]
    assert job_row(out) == ("failed", "ambiguous", 0)
    assert report.ledger.totals.failed == 1
    # A later run does not silently pay again for it.
    await run_manifest(one_job(tmp_path, "reset"), out, emulator.base_url, on_ambiguous="fail")
    assert len(emulator.requests) == 1


@pytest.mark.parametrize(
    ("faults", "cause"),
    [
        ("policy", "content_policy_violation"),
        ("500_noretry", "server_error"),
        ("policy_chunked", "content_policy_violation"),  # its code only in the last chunk
        ("policy200", "content_policy_violation"),  # an error object inside a 200
    ],
)
async def test_final_errors_fail_the_job_after_one_attempt(
    tmp_path: Path, emulator: Emulator, faults: str, cause: str
) -> None:
    out = tmp_path / "out"
    report = await run_manifest(one_job(tmp_path, faults), out, emulator.base_url)
    assert len(emulator.requests) == 1
    assert job_row(out) == ("failed", cause, 0)
    assert report.ledger.totals.failed == 1
    assert pd.read_csv(out / "ledger.csv").empty
    assert report.stop_reason is None
    # Final for the job: a rerun does not try again.
    await run_manifest(one_job(tmp_path, faults), out, emulator.base_url)
    assert len(emulator.requests) == 1


async def test_wrong_size_image_is_a_confirmed_charge_and_a_failure(
    tmp_path: Path, emulator: Emulator
) -> None:
    out = tmp_path / "out"
    await run_manifest(one_job(tmp_path, "badsize"), out, emulator.base_url)
    assert len(emulator.requests) == 1
    assert ledger_billing(out) == ["confirmed"]
    status, _, _ = job_row(out)
    assert status == "failed"
    assert not (out / "images" / "job.png").exists()
    assert temp_files(out) == []


async def test_retryable_failures_exhaust_attempts_then_a_rerun_retries(
    tmp_path: Path, emulator: Emulator
) -> None:
    out = tmp_path / "out"
    manifest = one_job(tmp_path, "503,503,503")
    report = await run_manifest(manifest, out, emulator.base_url, max_attempts=2)
    assert len(emulator.requests) == 2
    assert job_row(out) == ("failed", "server_error", 1)
    assert report.ledger.totals.failed == 1
    report = await run_manifest(manifest, out, emulator.base_url, max_attempts=2)
    assert len(emulator.requests) == 4
    assert report.ledger.totals.succeeded == 1
    assert db_rows(out, "SELECT MAX(attempt) FROM attempts") == [(4,)]


@pytest.mark.parametrize(
    ("faults", "status"), [("401", 401), ("403", 403), ("quota", 429), ("quota_chunked", 429)]
)
async def test_run_final_errors_stop_admitting_work(
    tmp_path: Path, emulator: Emulator, faults: str, status: int
) -> None:
    out = tmp_path / "out"
    jobs = [{"id": "first", "prompt": f"first [[faults:{faults}]]", "size": "1280x544"}]
    jobs += [{"id": f"later-{i}", "prompt": f"later {i}", "size": "1280x544"} for i in range(5)]
    report = await run_manifest(
        write_manifest(tmp_path, jobs), out, emulator.base_url, concurrency=1
    )
    assert len(emulator.requests) == 1
    assert report.stop_reason is not None and str(status) in report.stop_reason
    assert report.stop_error is not None and report.stop_error.status == status
    assert report.ledger.totals.pending == 6
    # Resumable: once the cause is fixed, a rerun does the lot.
    report = await run_manifest(write_manifest(tmp_path, jobs), out, emulator.base_url)
    assert report.ledger.totals.succeeded == 6


async def test_retry_after_longer_than_allowed_stops_the_run(
    tmp_path: Path, make_emulator: MakeEmulator
) -> None:
    emulator = await make_emulator(retry_after_s=30.0)
    out = tmp_path / "out"
    report = await run_manifest(
        one_job(tmp_path, "429"), out, emulator.base_url, max_retry_after_s=5.0
    )
    assert len(emulator.requests) == 1
    assert report.stop_reason is not None and "30 s" in report.stop_reason
    assert report.ledger.totals.pending == 1


async def test_retry_failed_by_cause(tmp_path: Path, emulator: Emulator) -> None:
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path,
        [
            {"id": "refused", "prompt": "a [[faults:policy]]", "size": "1280x544"},
            {"id": "broken", "prompt": "b [[faults:500_noretry]]", "size": "1280x544"},
            {"id": "fine", "prompt": "c", "size": "1280x544"},
        ],
    )
    report = await run_manifest(manifest, out, emulator.base_url)
    assert report.ledger.totals.failed == 2 and len(emulator.requests) == 3

    async def rerun(**options: object) -> RunReport:
        run_options = dataclasses.replace(_options(out, emulator.base_url), **options)
        return await Run(load_manifest(manifest), run_options).execute()

    report = await rerun()  # plain rerun: final failures stay failed
    assert len(emulator.requests) == 3 and report.plan.failed == 2
    report = await rerun(retry_failed=True, retry_only=frozenset({"server_error"}))
    assert report.plan.retried_failed == ["broken"]
    assert len(emulator.requests) == 4
    assert job_status(out, "broken") == "succeeded"
    assert job_status(out, "refused") == "failed"
    report = await rerun(retry_failed=True)
    assert report.plan.retried_failed == ["refused"]
    assert report.ledger.totals.succeeded == 3


def job_status(out: Path, job_id: str) -> str:
    return str(db_rows(out, f"SELECT status FROM jobs WHERE job_id = '{job_id}'")[0][0])


async def test_results_say_which_failures_a_rerun_retries(
    tmp_path: Path, emulator: Emulator
) -> None:
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path,
        [
            {"id": "busy", "prompt": "a [[faults:503,503]]", "size": "1280x544"},
            {"id": "refused", "prompt": "b [[faults:policy]]", "size": "1280x544"},
        ],
    )
    report = await run_manifest(manifest, out, emulator.base_url, max_attempts=2)
    results = pd.read_csv(out / "results.csv").set_index("job_id")
    assert bool(results.loc["busy", "retry_on_rerun"]) is True
    assert bool(results.loc["refused", "retry_on_rerun"]) is False
    assert report.ledger.totals.failed_retry_on_rerun == 1


@pytest.mark.parametrize(("faults", "format_"), [("escaped_b64", "b64_json"), ("cdn_flaky", "url")])
async def test_answers_a_careful_client_takes_cost_one_request(
    tmp_path: Path, emulator: Emulator, faults: str, format_: str
) -> None:
    """JSON escapes and spaces in the base64; a CDN that fails twice before it serves."""
    out = tmp_path / "out"
    report = await run_manifest(
        one_job(tmp_path, faults, response_format=format_), out, emulator.base_url
    )
    assert len(emulator.requests) == 1
    assert report.ledger.totals.succeeded == 1
    assert ledger_billing(out) == ["confirmed"]
    assert report.ledger.totals.confirmed_usd == emulator.billed_usd == 0.03


async def test_a_url_that_never_serves_is_booked_confirmed_then_made_again(
    tmp_path: Path, emulator: Emulator
) -> None:
    out = tmp_path / "out"
    report = await run_manifest(
        one_job(tmp_path, "cdn_dead", response_format="url"), out, emulator.base_url
    )
    assert len(emulator.requests) == 2
    assert ledger_billing(out) == ["confirmed", "confirmed"]
    assert report.ledger.totals.succeeded == 1
    assert report.ledger.totals.confirmed_usd == emulator.billed_usd == 0.06
    assert report.ledger.totals.possible_usd == 0


@pytest.mark.parametrize(
    "fields",
    [{}, {"images": ["refs/a.png"], "size": "auto"}],
    ids=["size omitted", "size auto"],
)
async def test_an_unpinned_size_must_still_be_one_of_the_30(
    tmp_path: Path, emulator: Emulator, fields: dict[str, object]
) -> None:
    make_ref(tmp_path / "refs", "a.png")
    out = tmp_path / "out"
    job = {"id": "job", "prompt": "a lamp [[faults:badsize]]", **fields}
    report = await run_manifest(write_manifest(tmp_path, [job]), out, emulator.base_url)
    assert len(emulator.requests) == 1
    assert job_row(out) == ("failed", "wrong_size", 0)
    assert ledger_billing(out) == ["confirmed"]
    assert "not one of the 30 sizes" in str(pd.read_csv(out / "results.csv")["error"][0])
    assert report.ledger.totals.confirmed_usd == emulator.billed_usd == 0.03


async def test_a_failure_that_ends_a_job_is_one_commit(tmp_path: Path, emulator: Emulator) -> None:
    """The attempt's outcome and the job's failed status: never a commit between the two, or a
    crash there leaves a billed job pending, paid for again by the next run."""
    out = tmp_path / "out"
    store = SqliteStore.open(out)
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    jobs = load_manifest(one_job(tmp_path, "badsize"))
    try:
        store.plan_jobs(jobs)
        async with ImagesClient(ClientConfig(emulator.base_url, TEST_KEY)) as client:
            await Pool(client, store, out / "images").run(jobs)
    finally:
        store.close()
    outcome = next(i for i, sql in enumerate(statements) if "UPDATE attempts SET state" in sql)
    failed = next(i for i, sql in enumerate(statements) if "SET status = 'failed'" in sql)
    assert outcome < failed
    assert "COMMIT" not in statements[outcome:failed]
    assert job_row(out) == ("failed", "wrong_size", 0)
    assert db_rows(out, "SELECT attempt, state FROM attempts") == [(1, "confirmed")]


async def test_a_network_os_error_is_a_possible_charge_not_a_full_disk(tmp_path: Path) -> None:
    """An ``OSError`` out of a request (a reset during the upload, as aiohttp before 3.10.6 let
    one through) may have been billed; only the client's own disk errors halt the run."""
    out = tmp_path / "out"
    calls: list[str] = []

    class ResetOnce:
        async def create(self, job: Job, folder: Path) -> ImageResult:
            calls.append(job.id)
            if len(calls) == 1:
                raise ConnectionResetError(104, "Connection reset by peer")
            tmp = temp_path_for(folder / f"{job.id}.part")
            buffer = io.BytesIO()
            Image.new("RGB", (1280, 544), "navy").save(buffer, format="PNG")
            tmp.write_bytes(buffer.getvalue())
            return ImageResult(tmp, len(buffer.getvalue()), None)

    jobs = load_manifest(one_job(tmp_path, "ok"))
    store = SqliteStore.open(out)
    try:
        store.plan_jobs(jobs)
        pool = Pool(ResetOnce(), store, out / "images", retry=RetryConfig(backoff_initial_s=0.001))
        result = await pool.run(jobs)
    finally:
        store.close()
    assert result.stop_reason is None and result.progress.succeeded == 1
    assert db_rows(out, "SELECT attempt, state FROM attempts ORDER BY attempt") == [
        (1, "possible"),
        (2, "confirmed"),
    ]


async def test_a_base_url_that_answers_404_stops_the_run_and_fails_no_job(
    tmp_path: Path, emulator: Emulator
) -> None:
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path, [{"id": f"j{i}", "prompt": f"p{i}", "size": "1280x544"} for i in range(5)]
    )
    wrong = emulator.base_url.removesuffix("/v1")  # every request: 404
    report = await run_manifest(manifest, out, wrong, concurrency=2)
    assert report.stop_error is not None and report.stop_error.status == 404
    assert report.stop_reason is not None and "wrong base URL" in report.stop_reason
    assert report.ledger.totals.failed == 0 and report.ledger.totals.pending == 5
    assert report.pool is not None and report.pool.progress.requests <= 2
    report = await run_manifest(manifest, out, emulator.base_url)
    assert report.ledger.totals.succeeded == 5


@pytest.mark.parametrize("first", ["good", "gone"])
async def test_a_404_that_names_its_error_fails_only_its_job(tmp_path: Path, first: str) -> None:
    """``model_not_found`` comes from the API: the endpoint exists, whether or not another
    answer came before it."""

    async def generate(request: web.Request) -> web.Response:
        if "missing" in (await request.json())["prompt"]:
            error = {"message": "The model does not exist", "code": "model_not_found"}
            return web.json_response({"error": error}, status=404)
        return web.json_response({"data": [{"b64_json": base64.b64encode(png()).decode()}]})

    app = web.Application()
    app.router.add_post("/v1/images/generations", generate)
    jobs = [
        {"id": "good", "prompt": "good", "size": "1280x544", "response_format": "b64_json"},
        {"id": "gone", "prompt": "missing", "size": "1280x544", "response_format": "b64_json"},
    ]
    jobs.sort(key=lambda job: job["id"] != first)
    out = tmp_path / "out"
    async with serve_app(app) as base:
        report = await run_manifest(
            write_manifest(tmp_path, jobs), out, f"{base}/v1", concurrency=1
        )
    assert report.stop_reason is None
    assert (report.ledger.totals.succeeded, report.ledger.totals.failed) == (1, 1)


async def test_a_dead_host_says_where_in_the_failures(tmp_path: Path) -> None:
    out = tmp_path / "out"
    base_url = closed_port_url()
    report = await run_manifest(one_job(tmp_path, "ok"), out, base_url, max_attempts=2)
    where = base_url.removeprefix("http://").removesuffix("/v1")
    assert report.pool is not None
    assert report.pool.failure_messages == {"not_sent": f"connection refused to {where}"}
    assert report.pool.progress.last_error == ("not_sent", f"connection refused to {where}")


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1280, 544), "teal").save(buffer, format="PNG")
    return buffer.getvalue()


async def test_a_cdn_out_of_reach_stops_the_run_after_three_billed_generations(
    tmp_path: Path, emulator: Emulator
) -> None:
    """Each url answer whose image cannot be fetched was billed: three in a row, none fetched
    between them, stop the run instead of paying ``max_attempts`` times a job, every run."""
    dead = ",".join(["cdn_dead"] * 10)
    jobs = [
        {"id": f"j{i}", "prompt": f"p{i} [[faults:{dead}]]", "response_format": "url"}
        for i in range(4)
    ]
    out = tmp_path / "out"
    report = await run_manifest(
        write_manifest(tmp_path, jobs), out, emulator.base_url, concurrency=1
    )
    assert len(emulator.requests) == 3
    assert report.stop_reason is not None and "could not be downloaded" in report.stop_reason
    assert report.ledger.totals.pending == 4 and report.ledger.totals.failed == 0
    assert report.ledger.totals.confirmed_usd == emulator.billed_usd == 0.09


async def test_a_billed_image_whose_success_the_checkpoint_refuses_is_still_counted(
    tmp_path: Path, emulator: Emulator
) -> None:
    """The image came back (billed) and is on disk, but the checkpoint refuses to record its
    success: the run stops on it, and its summary still counts the charge, as it does for a
    failure whose write is refused."""
    out = tmp_path / "out"
    jobs = load_manifest(one_job(tmp_path, ""))
    store = SqliteStore.open(out)
    try:
        store.plan_jobs(jobs)
        store.db.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE OF status ON jobs "
            "WHEN NEW.status = 'succeeded' BEGIN SELECT RAISE(ABORT, 'disk refused'); END"
        )
        async with ImagesClient(ClientConfig(emulator.base_url, TEST_KEY)) as client:
            result = await Pool(client, store, out / "images").run(jobs)
    finally:
        store.close()
    assert len(emulator.requests) == 1
    assert result.stop_reason is not None and "disk refused" in result.stop_reason
    assert (result.progress.succeeded, result.progress.requests) == (0, 1)
    assert result.progress.confirmed_micro_usd == 30_000  # billed: counted all the same
