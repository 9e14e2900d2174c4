"""Talking to the provider's images API over HTTP: one request in, one image file or one typed
error out.

The package owns everything between a validated job and a temp file on disk:

* :mod:`~runner.http.client`: the one aiohttp session of a run, the request for each endpoint
  (JSON for generations, multipart for edits), the answer streamed to a temp file, and a
  ``url`` image's download, retried on its own;
* :mod:`~runner.http.b64stream`: the base64 image of a JSON answer, decoded to the file as it
  arrives, never held whole;
* :mod:`~runner.http.answers`: what an answer means: an error class chosen by status and code
  (retry, fail the job, stop the run; billed or not), a 200 without an image, the token usage;
* :mod:`~runner.http.headers`: ``Retry-After`` and the ``x-ratelimit-*`` headers, which the
  pacer and the retry policy act on;
* :mod:`~runner.http.credentials`: which API key may be sent to which base URL.

It knows nothing of the checkpoint, the budget or the retry policy: the pool decides what to do
with an outcome; this package only reports it, precisely.
"""
