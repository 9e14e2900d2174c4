"""Opening the review page in the user's browser without showing its token to other users.

``webbrowser.open(url)`` starts the browser with the URL as an argument, and a process's
arguments are readable by every user of the machine (``ps``): the token would be theirs. So, as
Jupyter does, the browser is given a file instead: a page that redirects to the URL, in a
directory only this user may enter (``mkdtemp``: 0700), itself 0600, removed when the app
stops (the browser may read it a while after it was started, so not before).
"""

from __future__ import annotations

import html
import os
import tempfile
import webbrowser
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="referrer" content="no-referrer">
<meta http-equiv="refresh" content="0;url={url}">
<title>image-runner review</title></head>
<body><p>Opening <a href="{url}">the review page</a>...</p></body></html>
"""


@contextmanager
def browser_opener() -> Iterator[Callable[[str], None]]:
    """A function opening a URL in the browser through a private redirect file; the files it
    made are removed when the ``with`` block ends."""
    with tempfile.TemporaryDirectory(prefix="image-runner-review-") as folder:

        def open_page(url: str) -> None:
            path = Path(folder) / "open.html"
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(_PAGE.format(url=html.escape(url, quote=True)))
            webbrowser.open(path.as_uri())

        yield open_page
