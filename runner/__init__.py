"""image-runner: a batch job runner for OpenAI-compatible image-generation APIs."""

from runner.redact import install_log_redaction

__version__ = "0.1.0"

install_log_redaction()  # the key stays out of every log record of runner.*, whoever handles it
