"""The review app's HTTP side: an aiohttp server on 127.0.0.1 that only its user may use.

Who may: whoever holds the random token of its URL (printed, and handed to the browser in a
private file, never on a command line: see :mod:`.launch`). No cookie: a cookie of 127.0.0.1
would go to every port of the machine, other users' servers included. The page keeps the token
of its own URL in memory and sends it in the ``X-Review-Token`` header of every API call, which a
cross-site form cannot send and a cross-site ``fetch`` may send only after a CORS preflight this
server never grants; the images it shows carry it as ``?token=`` (an ``<img>`` sends no header),
on this server's address only. A decision (POST) is taken only with the header. Anything else
without the token gets 403; only the page's script and style, the same for everyone, are served
without. Every response says ``Content-Security-Policy: default-src 'none'`` but for the page's
own script, style, images and API, ``nosniff`` and ``no-referrer``: a prompt is only ever text on
the page, an image only an image, and the token never leaves in a ``Referer``.

A decision waits for a run's write transaction (in a worker thread, so the app goes on
serving) at most a few seconds; then it is refused with 503 and a message the page shows.

Files served are only those the checkpoint records: a job's image (``/image/<job_id>``, an
earlier version's ``/image/<job_id>/v<N>``), its thumbnail (``/thumb/...``, made on demand and
cached under ``thumbs/`` as the report does), its reference images (``/ref/<job_id>/<i>``, the
i-th path recorded for that job, full size for the viewer, and ``/refthumb/<job_id>/<i>``, its
thumbnail from the same cache, for the grid). No path ever comes from the request, and only
png, jpeg and webp files are sent, with the type of their bytes.

A run in object storage (``--out s3://...``, its state in PostgreSQL) is reviewed the same way:
its images are read from the store in a worker thread, whole (``read_bytes``: one image a
request), and its thumbnails are the report's cache there
(:class:`~runner.outputs.location_thumbs.LocationThumbnails`). Its references are files on this
machine, as the run recorded them.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Final

from aiohttp import web

from runner.errors import ReviewError, StorageError, StoreError
from runner.outputs.thumbs import ThumbCache, Thumbnails
from runner.provider import sniff_format
from runner.review import items
from runner.storage import Location, is_remote, open_location
from runner.store import open_review_log
from runner.store.base import Decision, ReviewLog

HOST: Final = "127.0.0.1"
TOKEN_HEADER: Final = "X-Review-Token"
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_STATIC: Final = {
    "/": ("index.html", "text/html"),
    "/static/review.js": ("review.js", "text/javascript"),
    "/static/review.css": ("review.css", "text/css"),
}
_MIME: Final = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_PUBLIC: Final = frozenset({"/static/review.js", "/static/review.css"})
_NO_TOKEN: Final = "open the address image-runner review printed: it carries the token"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ReviewServer:
    """The review app of one output folder (or object store's URL), served until :meth:`stop`;
    ``url`` (with its token) once started. Port 0 picks a free one."""

    def __init__(
        self, folder: Path | str, *, reviewer: str, port: int = 0, state_url: str | None = None
    ) -> None:
        self.folder = folder
        self.state_url = state_url  # a run whose state is in PostgreSQL; None: SQLite
        self.reviewer = reviewer
        self.port = port
        self.token = secrets.token_urlsafe(24)
        self._log: ReviewLog | None = None
        self._runner: web.AppRunner | None = None

    @property
    def origin(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.origin}/?token={self.token}"

    async def start(self) -> None:
        """Open the folder's review log and listen; raises :class:`~runner.errors.StoreError`
        for a folder with no checkpoint, ``OSError`` for a port in use."""
        self._log = open_review_log(self.folder, self.state_url)
        try:
            location = open_location(self.folder) if is_remote(self.folder) else None
            thumbs = await asyncio.to_thread(_thumbs_of, self.folder, location)  # a LIST
            self._runner = web.AppRunner(self._app(self._log, thumbs, location), access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, HOST, self.port).start()
        except BaseException:
            await self.stop()
            raise
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._log is not None:
            self._log.close()
            self._log = None

    async def __aenter__(self) -> ReviewServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _app(
        self, log: ReviewLog, thumbs: ThumbCache, location: Location | None
    ) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.on_response_prepare.append(_security_headers)
        routes = _Routes(log, self.reviewer, thumbs, location)
        for path in _STATIC:
            app.router.add_get(path, self._static)
        app.router.add_get("/api/items", routes.items)
        app.router.add_get("/api/items/{job_id}", routes.item)
        app.router.add_post("/api/review", routes.review)
        app.router.add_get("/thumb/{job_id}", routes.thumb)
        app.router.add_get(r"/thumb/{job_id}/v{version:\d+}", routes.thumb)
        app.router.add_get("/image/{job_id}", routes.image)
        app.router.add_get(r"/image/{job_id}/v{version:\d+}", routes.image)
        app.router.add_get(r"/ref/{job_id}/{index:\d+}", routes.reference)
        app.router.add_get(r"/refthumb/{job_id}/{index:\d+}", routes.reference_thumb)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "GET" and request.path in _PUBLIC:
            return await handler(request)
        header = request.headers.get(TOKEN_HEADER)
        if request.method == "POST" and header is None:
            return _error(403, "a decision is taken only from the review page itself")
        given = header or request.query.get("token", "")
        if not secrets.compare_digest(given.encode(), self.token.encode()):
            return _error(403, _NO_TOKEN)
        return await handler(request)

    async def _static(self, request: web.Request) -> web.Response:
        name, content_type = _STATIC[request.path]
        body = resources.files(__package__).joinpath("static", name).read_bytes()
        return web.Response(body=body, content_type=content_type, charset="utf-8")


class _Routes:
    """The API and the files, over one review log. Its reads are quick local SQLite reads on
    the event loop (a run's writes never block them); a decision, which may wait for a run's
    write, and thumbnails are made in worker threads, as images are read from an object store
    (``location``; None: the images are in the folder)."""

    def __init__(
        self, log: ReviewLog, reviewer: str, thumbs: ThumbCache, location: Location | None
    ) -> None:
        self.log = log
        self.reviewer = reviewer
        self.thumbs = thumbs
        self.location = location

    async def items(self, request: web.Request) -> web.Response:
        try:
            query = items.ItemsQuery.parse(request.query)
        except ValueError as exc:
            return _error(400, str(exc))
        return web.json_response(items.page(self.log.views(), query, self.log.folder.name))

    async def item(self, request: web.Request) -> web.Response:
        views = self.log.views()
        found = views.review_item(request.match_info["job_id"])
        if found is None:
            return _error(404, f"no job {request.match_info['job_id']} in this folder")
        return web.json_response(items.item_json(views, found))

    async def review(self, request: web.Request) -> web.Response:
        try:
            job_id, decision, version = items.parse_decision(await request.json())
        except (ValueError, json.JSONDecodeError) as exc:
            return _error(400, str(exc))
        try:
            await asyncio.to_thread(
                self.log.decide, [Decision(job_id, decision, version)], self.reviewer
            )
        except ReviewError as exc:
            return _error(409, str(exc))
        except StoreError as exc:  # busy past the timeout, or unwritable: nothing recorded
            return _error(503, str(exc))
        views = self.log.views()
        found = views.review_item(job_id)
        assert found is not None  # decided, so it exists
        return web.json_response(
            {"item": items.item_json(views, found), "counts": views.review_counts()}
        )

    async def thumb(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        image = items.recorded_image(self.log.views(), job_id, request.match_info.get("version"))
        if image is None:
            return _error(404, f"{job_id}: no such image recorded")
        # The report's cache: a thumb either makes serves the other, and a report's sweep may
        # delete one between finding it and reading it: then it is made again, once.
        for _ in range(2):
            thumb = await asyncio.to_thread(
                self.thumbs.of_image, job_id, image.path, image.sha256, image.stat
            )
            if thumb.name is None:
                return _error(404, f"{job_id}: {thumb.note}")
            try:
                data = await asyncio.to_thread(self.thumbs.read, thumb.name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                return _error(404, f"{job_id}: thumbnail unreadable: {exc.strerror or exc}")
            except StorageError as exc:
                return _error(404, f"{job_id}: thumbnail unreadable: {exc}")
            if data:
                return web.Response(body=data, content_type="image/webp")
        return _error(503, f"{job_id}: its thumbnail was deleted as it was made; reload the page")

    async def image(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job_id"]
        image = items.recorded_image(self.log.views(), job_id, request.match_info.get("version"))
        if image is None:
            return _error(404, f"{job_id}: no such image recorded")
        if self.location is not None:
            return await _stored_image(self.location, image.path)
        return await _image_file(self.log.folder / image.path)

    async def reference(self, request: web.Request) -> web.StreamResponse:
        job_id, index = request.match_info["job_id"], int(request.match_info["index"])
        found = self.log.views().review_item(job_id)
        if found is None or index >= len(found.references):
            return _error(404, f"{job_id}: no reference image {index}")
        return await _image_file(Path(found.references[index]))

    async def reference_thumb(self, request: web.Request) -> web.Response:
        job_id, index = request.match_info["job_id"], int(request.match_info["index"])
        found = self.log.views().review_item(job_id)
        if found is None or index >= len(found.references):
            return _error(404, f"{job_id}: no reference image {index}")
        # The report's cache again: a reference shared by many edits is made into one thumb.
        thumb = await asyncio.to_thread(self.thumbs.of_reference, found.references[index])
        if thumb.name is None:
            return _error(404, f"{job_id}: {thumb.note}")
        try:
            data = await asyncio.to_thread(self.thumbs.read, thumb.name)
        except (OSError, StorageError) as exc:
            return _error(404, f"{job_id}: thumbnail unreadable: {exc}")
        return web.Response(body=data, content_type="image/webp")


async def _image_file(path: Path) -> web.StreamResponse:
    """``path`` if it is a png, jpeg or webp file, with the type of its bytes."""
    try:
        with path.open("rb") as file:
            kind = sniff_format(file.read(16))
    except OSError as exc:
        return _error(404, f"{path.name}: {exc.strerror or exc}")
    if kind is None:
        return _error(404, f"{path.name}: not a png, jpeg or webp image")
    return web.FileResponse(path, headers={"Content-Type": _MIME[kind]})


def _thumbs_of(folder: Path | str, location: Location | None) -> ThumbCache:
    """The thumbnail cache of the images in ``folder``, or in ``location`` when it is set."""
    if location is None:
        return Thumbnails(Path(folder))
    from runner.outputs.location_thumbs import LocationThumbnails

    return LocationThumbnails(location)


async def _stored_image(location: Location, key: str) -> web.Response:
    """The object ``key`` of ``location`` if it is a png, jpeg or webp image, with the type of
    its bytes."""
    try:
        data = await asyncio.to_thread(location.read_bytes, key)
    except StorageError as exc:
        return _error(404, str(exc))
    kind = sniff_format(data[:16])
    if kind is None:
        return _error(404, f"{location.url}/{key}: not a png, jpeg or webp image")
    return web.Response(body=data, headers={"Content-Type": _MIME[kind]})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _security_headers(_: web.Request, response: web.StreamResponse) -> None:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-cache"


async def serve_review(
    folder: Path | str,
    *,
    reviewer: str,
    port: int,
    on_ready: Callable[[str], None],
    state_url: str | None = None,
) -> None:
    """Serve the review app of ``folder`` until cancelled (Ctrl-C); ``on_ready`` gets its URL
    once it listens."""
    async with ReviewServer(folder, reviewer=reviewer, port=port, state_url=state_url) as server:
        on_ready(server.url)
        await asyncio.Event().wait()
