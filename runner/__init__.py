"""image-runner: a batch job runner for OpenAI-compatible image-generation APIs.

The Python API, for notebooks and programs; the CLI (:mod:`runner.cli`) is built on it::

    import pandas as pd
    import runner

    prompts = pd.DataFrame({"prompt": ["a red fox", "a grey owl"], "size": "1280x1280"})
    report = runner.run(prompts, out="output/animals", emulate=True)
    report.results()  # one row per job: status, image_path, cost_usd, error, ...

- :func:`run` (synchronous, also inside Jupyter) and :func:`arun` (``await``) take a manifest's
  path, a list of dicts or a DataFrame, validated as a manifest is (:func:`load_manifest`,
  :func:`load_jobs`), and return a :class:`RunReport`: counts, spend, why it stopped, results
  and ledger as DataFrames. Running again into the same ``out`` finishes only what is left.
- :class:`Options`: the options of a run, with the CLI's defaults; :func:`run` takes them as
  keyword arguments too.
- :class:`Emulator`: the built-in API emulator, to rehearse offline.
- The errors a caller catches, all :class:`RunnerError`: :class:`ManifestError` (its ``str()``
  is what the CLI prints), :class:`OptionsError`, :class:`CredentialsError`,
  :class:`OutputLockedError`, :class:`StoreError`.

Importing the package masks the API key in every log record of the ``runner.*`` loggers, so a
program's own log handlers never see it.
"""

from runner.core.options import Options
from runner.errors import (
    CredentialsError,
    ManifestError,
    ManifestIssue,
    OptionsError,
    OutputLockedError,
    RunnerError,
    StoreError,
)
from runner.library import RunReport, arun, run
from runner.manifest import Manifest, load_jobs, load_manifest
from runner.redact import install_log_redaction
from runner.rehearsal import Emulator

__version__ = "0.1.0"

__all__ = [
    "CredentialsError",
    "Emulator",
    "Manifest",
    "ManifestError",
    "ManifestIssue",
    "Options",
    "OptionsError",
    "OutputLockedError",
    "RunReport",
    "RunnerError",
    "StoreError",
    "__version__",
    "arun",
    "load_jobs",
    "load_manifest",
    "run",
]

install_log_redaction()  # the key stays out of every log record of runner.*, whoever handles it
