"""The review app's HTTP side against a real run on the emulator: the token, the checks on
decisions, the filters and pages of the API, and the files it serves (only those the
checkpoint records)."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from runner.emulator import Emulator
from runner.review import ReviewServer
from runner.review.server import CSP, TOKEN_HEADER
from runner.store import open_store
from tests.conftest import db_exec
from tests.reviewing import client_of, item_of, made_run, post_decision, shots

JOBS = [*shots(6), {"id": "banned", "prompt": "a forbidden thing [[faults:policy]]"}]


@pytest.fixture
async def out(tmp_path: Path, emulator: Emulator) -> Path:
    return await made_run(tmp_path, emulator.base_url, JOBS)


@pytest.fixture
async def server(out: Path) -> AsyncIterator[ReviewServer]:
    async with ReviewServer(out, reviewer="ada") as server:
        yield server


async def test_every_request_needs_the_token(server: ReviewServer) -> None:
    """In the header (the page's API calls) or the query (its images), never a cookie: one
    of 127.0.0.1 would be sent to every port of the machine."""
    paths = ["/", "/api/items", "/image/shot-01", "/thumb/shot-01", "/ref/shot-00/0",
             "/refthumb/shot-00/0"]  # fmt: skip
    async with aiohttp.ClientSession(server.origin) as anyone:
        for path in paths:
            for params, headers in (({}, {}), ({"token": "x"}, {}), ({}, {TOKEN_HEADER: "x"})):
                async with anyone.get(path, params=params, headers=headers) as response:
                    assert response.status == 403, path
                    assert "token" in (await response.json())["error"]
                    assert response.headers["Content-Security-Policy"] == CSP
        for path in paths:
            async with anyone.get(path, params={"token": server.token}) as response:
                assert response.status == 200, path
                assert "Set-Cookie" not in response.headers
                assert response.headers["Content-Security-Policy"] == CSP
                assert response.headers["X-Content-Type-Options"] == "nosniff"
                assert response.headers["Referrer-Policy"] == "no-referrer"
        # The page's script and style are the same for everyone: served without the token.
        for path in ("/static/review.js", "/static/review.css"):
            async with anyone.get(path) as response:
                assert response.status == 200, path
    async with client_of(server) as session, session.get("/api/items") as response:
        assert response.status == 200  # the token in the header, as the page sends it


async def test_a_decision_only_from_the_page(server: ReviewServer, out: Path) -> None:
    """A POST must carry the token in its header, which a cross-site form cannot send, nor a
    cross-site fetch without a CORS preflight this server never grants."""
    body = {"job_id": "shot-01", "decision": "rejected"}
    async with aiohttp.ClientSession(server.origin) as anyone:
        params = {"token": server.token}  # as a form would send it, had it the token
        async with anyone.post("/api/review", json=body, params=params) as response:
            assert response.status == 403
        async with anyone.post("/api/review", json=body, headers={TOKEN_HEADER: "x"}) as r:
            assert r.status == 403
        async with anyone.options("/api/review", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": TOKEN_HEADER,
        }) as response:  # fmt: skip
            assert "Access-Control-Allow-Origin" not in response.headers
        assert item_of(out, "shot-01").review == "unreviewed"
        headers = {TOKEN_HEADER: server.token}
        async with anyone.post("/api/review", json=body, headers=headers) as response:
            assert response.status == 200
    assert item_of(out, "shot-01").review == "rejected"


async def test_decisions_are_written_at_once_with_who(server: ReviewServer, out: Path) -> None:
    async with client_of(server) as session:
        status, answer = await post_decision(session, "shot-02", "approved", 1)
        assert status == 200
        assert answer["item"]["review"] == "approved"
        assert answer["item"]["reviewed_by"] == "ada"
        assert answer["counts"]["approved"] == 1 and answer["counts"]["unreviewed"] == 5
        item = item_of(out, "shot-02")
        assert (item.review, item.reviewed_by, item.version) == ("approved", "ada", 1)
        # Undo: the page writes back the state the shot had.
        status, answer = await post_decision(session, "shot-02", "unreviewed", 1)
        assert status == 200 and item_of(out, "shot-02").review == "unreviewed"


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"job_id": "nope", "decision": "approved"}, 409, "nope"),
        ({"job_id": "banned", "decision": "rejected"}, 409, "banned"),
        ({"job_id": "shot-01", "decision": "approved", "version": 2}, 409, "shot-01"),
        ({"job_id": "shot-01", "decision": "maybe"}, 400, "decision 'maybe'"),
        ({"job_id": "shot-01", "decision": "approved", "version": "1"}, 400, "version '1'"),
        ({"decision": "approved"}, 400, "job_id"),
        (["shot-01"], 400, "JSON object"),
    ],
)
async def test_a_decision_that_cannot_be_is_refused(
    server: ReviewServer, out: Path, body: object, status: int, error: str
) -> None:
    async with client_of(server) as session, session.post("/api/review", json=body) as r:
        assert r.status == status
        assert error in (await r.json())["error"]
    assert item_of(out, "shot-01").review == "unreviewed"


async def get_json(session: aiohttp.ClientSession, path: str, **params: str) -> object:
    async with session.get(path, params=params) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def test_filters_counts_and_pages(server: ReviewServer) -> None:
    async with client_of(server) as session:
        await post_decision(session, "shot-01", "approved")
        await post_decision(session, "shot-04", "rejected")
        page = await get_json(session, "/api/items")
        assert isinstance(page, dict)
        assert page["total"] == 7 and page["folder"] == "out"
        assert page["counts"] == {
            "succeeded": 6, "failed": 1, "pending": 0,
            "approved": 1, "rejected": 1, "unreviewed": 4,
        }  # fmt: skip
        ids = [item["job_id"] for item in page["items"]]
        assert sorted(ids) == sorted(job["id"] for job in JOBS)
        seen = []
        for offset in range(0, 7, 3):
            part = await get_json(session, "/api/items", offset=str(offset), limit="3")
            assert isinstance(part, dict) and part["total"] == 7
            seen += [item["job_id"] for item in part["items"]]
        assert seen == ids
        failed = await get_json(session, "/api/items", status="failed")
        assert isinstance(failed, dict)
        assert [(i["job_id"], i["error_cause"]) for i in failed["items"]] == [
            ("banned", "content_policy_violation")
        ]
        for review, expected in (("approved", ["shot-01"]), ("rejected", ["shot-04"])):
            found = await get_json(session, "/api/items", review=review)
            assert isinstance(found, dict)
            assert [i["job_id"] for i in found["items"]] == expected and found["total"] == 1
        both = await get_json(session, "/api/items", status="succeeded", review="unreviewed")
        assert isinstance(both, dict) and both["total"] == 4
        for bad in ({"status": "done"}, {"review": "ok"}, {"limit": "0"}, {"offset": "-1"}):
            async with session.get("/api/items", params=bad) as response:
                assert response.status == 400, bad


async def test_an_item_shows_its_references_by_name(server: ReviewServer) -> None:
    async with client_of(server) as session:
        edit = await get_json(session, "/api/items/shot-00")
        assert isinstance(edit, dict)
        assert edit["references"] == ["vase.png", "table.jpg"]  # names, never paths
        assert edit["versions"] == [] and edit["version"] == 1
        async with session.get("/api/items/nope") as response:
            assert response.status == 404


async def test_images_thumbnails_and_references_are_served(server: ReviewServer, out: Path) -> None:
    async with client_of(server) as session:
        async with session.get("/image/shot-01") as response:
            assert response.status == 200 and response.content_type == "image/png"
            assert await response.read() == (out / "images" / "shot-01.png").read_bytes()
        async with session.get("/thumb/shot-01") as response:
            assert response.status == 200 and response.content_type == "image/webp"
            thumb = await response.read()
        sha = item_of(out, "shot-01").sha256
        assert sha and (out / "thumbs" / f"shot-01-{sha[:12]}.webp").read_bytes() == thumb
        refs = out.parent / "refs"
        for index, (name, kind) in enumerate([("vase.png", "png"), ("table.jpg", "jpeg")]):
            async with session.get(f"/ref/shot-00/{index}") as response:
                assert response.status == 200 and response.content_type == f"image/{kind}"
                assert await response.read() == (refs / name).read_bytes()
            # The grid's: the reference's thumbnail, in the report's cache (named by its sha).
            async with session.get(f"/refthumb/shot-00/{index}") as response:
                assert response.status == 200 and response.content_type == "image/webp"
                digest = hashlib.sha256((refs / name).read_bytes()).hexdigest()
                assert (out / "thumbs" / f"ref-{digest[:12]}.webp").read_bytes() == (
                    await response.read()
                )
        for path in (
            "/ref/shot-00/2", "/ref/shot-01/0", "/refthumb/shot-00/2", "/refthumb/shot-01/0",
            "/image/banned", "/thumb/banned",
        ):  # fmt: skip
            async with session.get(path) as response:
                assert response.status == 404, path


async def test_no_path_from_the_request(server: ReviewServer, out: Path) -> None:
    (out.parent / "secret.png").write_bytes((out / "images" / "shot-01.png").read_bytes())
    async with client_of(server) as session:
        for path in (
            "/image/..%2Fsecret.png", "/image/../secret.png", "/ref/..%2F..%2Fsecret.png/0",
            "/image/%2e%2e/checkpoint.sqlite", "/static/..%2F..%2Fcheckpoint.sqlite",
            "/thumb/shot-01/v0", "/image/shot-01/v1", "/ref/shot-00/-1",
        ):  # fmt: skip
            async with session.get(path) as response:
                assert response.status in (403, 404), path
                assert not response.content_type.startswith("image/"), path


async def test_a_reference_that_is_no_image_is_not_served(server: ReviewServer, out: Path) -> None:
    (out.parent / "refs" / "vase.png").write_text("<script>alert(1)</script>")
    async with client_of(server) as session, session.get("/ref/shot-03/0") as response:
        assert response.status == 404
        assert "not a png, jpeg or webp" in (await response.json())["error"]


async def test_an_earlier_version_is_served_from_its_record(
    server: ReviewServer, out: Path
) -> None:
    """A versions row (as a regenerating run writes it) makes its file servable, and the
    shot's JSON lists it with its reason and review."""
    kept = out / "rejected" / "shot-01.v1.png"
    kept.parent.mkdir()
    shutil.copyfile(out / "images" / "shot-01.png", kept)
    old = item_of(out, "shot-01")
    db_exec(
        out,
        "INSERT INTO versions (job_id, version, image_path, sha256, width, height, reason, "
        "retired_at) VALUES ('shot-01', 1, 'rejected/shot-01.v1.png', ?, ?, ?, 'rejected', "
        "'2026-01-01T00:00:00.000+00:00')",
        (old.sha256, old.width, old.height),
    )
    db_exec(out, "UPDATE jobs SET version = 2 WHERE job_id = 'shot-01'")
    async with client_of(server) as session:
        item = await get_json(session, "/api/items/shot-01")
        assert isinstance(item, dict) and item["version"] == 2
        assert [(v["version"], v["reason"], v["has_image"]) for v in item["versions"]] == [
            (1, "rejected", True)
        ]
        async with session.get("/image/shot-01/v1") as response:
            assert response.status == 200 and await response.read() == kept.read_bytes()
        async with session.get("/thumb/shot-01/v1") as response:
            assert response.status == 200 and response.content_type == "image/webp"
        async with session.get("/image/shot-01/v3") as response:
            assert response.status == 404


async def test_a_decision_while_a_run_holds_the_folder(server: ReviewServer, out: Path) -> None:
    run = open_store(out)  # what a run holds: the folder's lock and a writer
    try:
        async with client_of(server) as session:
            status, _ = await post_decision(session, "shot-05", "rejected")
            assert status == 200
        found = run.views().review_item("shot-05")
        assert found is not None and found.review == "rejected"
    finally:
        run.close()
