"""Launchers of a run's workers on a cluster scheduler, for a run whose state many workers share
(``--state``). Each starts worker processes that run the worker loop of ``image-runner work``,
supervises them, and gives the lifecycle what it gives a pool: progress, a stop, a result.

:mod:`.ray`: worker actors on Ray (``run --ray [ADDRESS] --workers N``), an optional extra.
Kubernetes and Slurm need no code here: they run ``image-runner work`` themselves.
"""
