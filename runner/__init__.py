"""image-runner: a batch job runner for OpenAI-compatible image-generation APIs."""

__version__ = "0.1.0"
