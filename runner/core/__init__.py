"""The run itself: from validated jobs to images and a settled checkpoint.

* :mod:`~runner.core.lifecycle`: one run start to finish (:class:`~runner.core.lifecycle.Run`):
  lock the folder, plan, send, write the books; and its life: a first stop is graceful (no new
  request, those in flight get a grace period), a second one, or the end of the grace, stops at
  once. Callers (the CLI's signal handlers, the Python API's KeyboardInterrupt) only call
  :meth:`~runner.core.lifecycle.Run.stop`.
* :mod:`~runner.core.plan`: resume: the manifest's jobs against the checkpoint and the files on
  disk, in batches: what is done, what was adopted from disk, what is left to do.
* :mod:`~runner.core.pool`: the bounded async pool: a request slot per attempt, the crash-safe
  order of every attempt (intent, request, image saved, outcome), the failure bookkeeping.
* :mod:`~runner.core.admission`: the gate before each attempt: circuit breaker, pacer, budget.
* :mod:`~runner.core.pacer`: pacing to the provider's rate limit, per endpoint.
* :mod:`~runner.core.retry`: the tenacity policy: what is retried, backoff, Retry-After.
* :mod:`~runner.core.options`: the options of a run, with their defaults, checked when made,
  turned into the configs above (the key and base URL looked up as the CLI does).

It talks to the API through :mod:`runner.http`, saves images with :mod:`runner.images`, keeps
its state through the :class:`~runner.store.base.Store` protocol, and never prints: it reports
through callbacks and its return values.
"""
