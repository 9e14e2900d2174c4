"""Manifests (YAML, CSV) and Python records turned into validated jobs."""

from runner.manifest.load import YAML_MAX_BYTES, Manifest, load_jobs, load_manifest

__all__ = ["YAML_MAX_BYTES", "Manifest", "load_jobs", "load_manifest"]
