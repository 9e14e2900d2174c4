"""Where a run's images and outputs go: a local folder or an object store, behind one
:class:`~runner.storage.base.Location` interface.

* :mod:`~runner.storage.base`: the interface, :class:`ObjectInfo`, the key and checksum rules;
* :mod:`~runner.storage.local`: a folder, plain files (conditional create by ``os.link``);
* :mod:`~runner.storage.remote`: fsspec stores (``gs://``, ``az://``), optional extras;
* :mod:`~runner.storage.s3`: S3 and compatibles, with SHA-256 checksums and paged listings;
* :mod:`~runner.storage.images`: :func:`save_image_to`, a verified image into a location,
  never overwriting one already there.

:func:`open_location` turns ``--out`` into a location.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from runner.storage.base import Location, ObjectInfo, PutResult, is_remote, location_url
from runner.storage.images import SavedImage, save_image_to
from runner.storage.local import LocalLocation

__all__ = [
    "LocalLocation",
    "Location",
    "ObjectInfo",
    "PutResult",
    "SavedImage",
    "is_remote",
    "location_url",
    "open_location",
    "save_image_to",
]


def open_location(url_or_path: str | Path) -> Location:
    """The location ``url_or_path`` names: a local path or ``file://`` URL (a folder), or
    ``s3://``, ``gs://``, ``az://`` ``bucket/prefix`` (these need their extra installed,
    ``pip install "image-runner[s3]"``, and raise :class:`~runner.errors.StorageError` saying so
    when it is missing)."""
    if not is_remote(url_or_path):
        text = str(url_or_path)
        if text.lower().startswith("file://"):
            return LocalLocation(Path(unquote(urlparse(text).path)))
        return LocalLocation(Path(text).expanduser())
    from runner.storage.remote import open_remote

    return open_remote(str(url_or_path))
