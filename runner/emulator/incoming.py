"""A request to the emulator's API as received: its body parsed, its key checked, its fields
validated into the job to render.

It owns the provider's request rules as the emulator enforces them: JSON for generations,
multipart for edits (reference parts named ``image`` or ``image[]``), the rejected fields, the
models, the response formats, the 30 sizes and the default size of each endpoint (``auto`` on an
edit follows the reference the prompt edits), and the ``[[faults:...]]`` directive. Every
violation raises the OpenAI-shaped :class:`~runner.emulator.errors.ErrorReply` to answer with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from aiohttp import BodyPartReader, web

from runner.emulator.errors import ErrorReply
from runner.emulator.faults import parse_directive
from runner.emulator.render import closest_size, edit_target, image_dimensions
from runner.provider import (
    AUTO_SIZE,
    DEFAULT_RESPONSE_FORMAT,
    MODELS,
    REJECTED_FIELDS,
    RESPONSE_FORMATS,
    SIZE_SET,
    Endpoint,
    parse_size,
)

DEFAULT_GENERATION_SIZE: Final = "1280x1280"
_IMAGE_PART_NAMES: Final = ("image", "image[]")


@dataclass
class Incoming:
    """A request body, parsed but not yet validated."""

    fields: dict[str, object] = field(default_factory=dict)
    images: list[tuple[str, bytes]] = field(default_factory=list)
    error: ErrorReply | None = None


@dataclass(frozen=True)
class RenderJob:
    model: str
    prompt: str
    width: int
    height: int
    response_format: str
    image_count: int
    directive: tuple[str, ...] | None

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


async def read_body(request: web.Request, endpoint: Endpoint) -> Incoming:
    incoming = Incoming()
    try:
        if endpoint == "generations":
            body = json.loads(await request.read())
            if not isinstance(body, dict):
                raise ErrorReply(400, "The body must be a JSON object.", None, "invalid_json")
            incoming.fields = body
            return incoming
        if not request.content_type.startswith("multipart/"):
            raise ErrorReply(400, "Edits take multipart/form-data.", None, "invalid_content_type")
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader) or part.name is None:
                continue
            if part.name in _IMAGE_PART_NAMES:
                incoming.images.append((part.name, bytes(await part.read(decode=True))))
            else:
                incoming.fields[part.name] = await part.text()
    except ErrorReply as exc:
        incoming.error = exc
    except ValueError as exc:  # bad JSON, bad UTF-8, a broken multipart boundary
        incoming.error = ErrorReply(400, f"Could not parse the body: {exc}", None, "invalid_body")
    return incoming


def check_auth(request: web.Request, api_key: str | None) -> None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ErrorReply(401, "You didn't provide an API key.", None, "invalid_api_key")
    if api_key is not None and key.strip() != api_key:
        # Echoed in full, worse than OpenAI's partial mask, so redaction is tested hard.
        message = f"Incorrect API key provided: {key.strip()}."
        raise ErrorReply(401, message, None, "invalid_api_key")


def _string_field(fields: Mapping[str, object], name: str) -> str | None:
    value = fields.get(name)
    if value is None or isinstance(value, str):
        return value
    raise ErrorReply(400, f"'{name}' must be a string.", name, "invalid_type")


def validate(endpoint: Endpoint, incoming: Incoming) -> RenderJob:
    fields = incoming.fields
    for name in REJECTED_FIELDS:
        if name in fields:
            raise ErrorReply(400, f"'{name}' is not supported.", name, "unsupported_parameter")
    model = _string_field(fields, "model")
    if not model:
        raise ErrorReply(400, "You must provide a model.", "model", "missing_required_parameter")
    if model not in MODELS:
        message = f"The model '{model}' does not exist or you do not have access to it."
        raise ErrorReply(404, message, "model", "model_not_found")
    prompt = _string_field(fields, "prompt")
    if prompt is None or not prompt.strip():
        raise ErrorReply(400, "You must provide a prompt.", "prompt", "missing_required_parameter")
    response_format = _string_field(fields, "response_format") or DEFAULT_RESPONSE_FORMAT[endpoint]
    if response_format not in RESPONSE_FORMATS:
        message = f"Invalid response_format '{response_format}'; use url or b64_json."
        raise ErrorReply(400, message, "response_format", "invalid_value")
    dimensions = [image_dimensions(data) for _, data in incoming.images]
    if endpoint == "edits" and not dimensions:
        message = "Edits need at least one image."
        raise ErrorReply(400, message, "image", "missing_required_parameter")
    size = _string_field(fields, "size")
    if size is None:
        size = DEFAULT_GENERATION_SIZE if endpoint == "generations" else AUTO_SIZE
    if size == AUTO_SIZE and endpoint == "edits":
        size = closest_size(*dimensions[edit_target(prompt, len(dimensions))])
    if size not in SIZE_SET:
        message = f"Invalid size '{size}'; use one of the 30 sizes, e.g. 2048x2048."
        raise ErrorReply(400, message, "size", "invalid_size")
    width, height = parse_size(size)
    directive = parse_directive(prompt)
    return RenderJob(model, prompt, width, height, response_format, len(dimensions), directive)
