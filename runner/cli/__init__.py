"""The command line, ``image-runner``: the only place that prints and exits.

It owns argument parsing (:mod:`~runner.cli.parser`, the options of ``run`` being those of
:class:`~runner.core.options.Options`), what a run prints (:mod:`~runner.cli.printing`: the
progress bar, the summary, the dry run's plan), the machine-readable summary of ``run --json``
and ``--notify`` (:mod:`~runner.cli.summary`), the commands other than ``run``
(:mod:`~runner.cli.commands`: validate, emulate, report, status, export), and the entry point
with its exit codes and the ``run`` command, which wires signals to the run's stop
(:mod:`~runner.cli.main`). The work itself is the Python API's (:mod:`runner.library`).
"""

from runner.cli.main import main

__all__ = ["main"]
