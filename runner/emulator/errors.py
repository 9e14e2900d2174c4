"""The emulator's error reply, shaped like OpenAI's; shared by validation, faults and rendering.

Raising :class:`ErrorReply` anywhere below the request handler turns into that reply.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

INVALID_REQUEST = "invalid_request_error"


class ErrorReply(Exception):
    """An error reply, shaped like OpenAI's: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        error_type: str = INVALID_REQUEST,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.error_type = error_type

    def response(self, headers: Mapping[str, str] | None = None) -> web.Response:
        error = {"message": self.message, "type": self.error_type}
        body = {"error": {**error, "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status, headers=headers)
