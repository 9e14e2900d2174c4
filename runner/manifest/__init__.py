"""Jobs in: manifests (YAML, CSV) and Python records (dicts, a DataFrame) turned into validated
:class:`~runner.jobs.Job` specs, every problem of every row reported at once.

The package owns everything between the user's words and a job the rest of the runner may
trust: reading (:mod:`.read`: files and records into raw rows), the one validator
(:mod:`.validate`: values, sizes, ids; :mod:`.references`: reference images), prompt matrices
and ``repeat`` (:mod:`.matrix`), and holding a million jobs compactly (:mod:`.spool`). It never
touches the network. :mod:`.load` puts them together into the API below.
"""

from runner.manifest.load import Manifest, load_jobs, load_manifest
from runner.manifest.read import JOB_FIELDS, YAML_MAX_BYTES

__all__ = ["JOB_FIELDS", "YAML_MAX_BYTES", "Manifest", "load_jobs", "load_manifest"]
