"""Issue 12's acceptance with Ray as the launcher: ``image-runner run ... --ray ADDRESS
--workers 4`` on a 2-node local Ray cluster, its state in PostgreSQL and its output in S3
(moto), against the emulator with an unannounced rate limit and injected faults, while a thread
kills one actor's process with SIGKILL every few seconds (Ray restarts it, the driver calls it
again). The same books as the worker processes' (test_scaleout.py) must hold."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ray.cluster_utils import Cluster

from tests import services
from tests.chaos import (
    CHAOS_LEASE_S,
    Workers,
    chaos_emulator,
    chaos_env,
    check_every_job_once,
    killing_actors,
    write_jobs,
)

# One process (pytest -n --dist loadgroup) runs both Ray modules, one cluster after the other.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

JOBS = 2000


@pytest.fixture(scope="module")
def ray_cluster(moto_server: services.Moto) -> Iterator[Cluster]:
    """Two nodes of 2 CPUs each, started once moto's ``AWS_*`` variables are set: the actors'
    processes inherit them, and the short lease, from the nodes, which inherit them from this
    process."""
    with services.start_ray_cluster(CHAOS_LEASE_S) as cluster:
        yield cluster


def test_four_ray_actors_killed_and_restarted_run_every_job_once_into_s3(
    ray_cluster: Cluster,
    tmp_path: Path,
    pg_url: str,
    s3_bucket: str,
) -> None:
    emulator, out = chaos_emulator(), f"s3://{s3_bucket}/ray"
    command = ["run", str(write_jobs(tmp_path, JOBS)), "--state", pg_url, "--out", out]
    command += ["--base-url", emulator.url, "--concurrency", "8", "--timeout", "20"]
    command += ["--no-progress", "--ray", ray_cluster.address, "--workers", "4"]
    driver = Workers([command], chaos_env(), tmp_path / "logs")
    try:
        driver.start_all()
        process = driver.processes[0]
        assert process is not None
        with killing_actors(pg_url, out, process.pid) as killed:
            code = driver.wait(timeout_s=900)
        assert code == [0], driver.output()
        figures = check_every_job_once(emulator, out, pg_url, JOBS, len(killed))
        assert len(killed) >= 20, driver.output()  # a kill every 3-6 s for >= 200 s
        print(f"\n4 Ray actors into S3: {figures}")  # shown by pytest -s, or -rP
    finally:
        driver.kill_all()
        emulator.stop()
