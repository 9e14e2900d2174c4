"""The review app of an output folder: ``image-runner review OUT``.

It owns the decisions a person makes about finished images, approve or reject, and how they are
made: a local web page (:mod:`.server`, its HTTP side; :mod:`.items`, what the page is sent;
:mod:`.launch`, opening it in the browser; the page itself in ``static/``) and, for scripts,
the checked batch of :func:`~runner.review.decisions.decide_ids`. Every decision goes through
the store's :class:`~runner.store.base.ReviewLog`, which appends it to the checkpoint and
touches nothing else; besides, the app only makes thumbnails (the report's cache, under
``thumbs/``). It takes no lock and works while a run is going on. What a decision does is the
next run's business (a rejected image is regenerated, an approved one never touched).
"""

from __future__ import annotations

from runner.review.decisions import decide_ids, reviewer_name
from runner.review.server import ReviewServer, serve_review

__all__ = ["ReviewServer", "decide_ids", "reviewer_name", "serve_review"]
