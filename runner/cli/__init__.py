"""The command line: `image-runner` and its commands."""

from runner.cli.main import main

__all__ = ["main"]
