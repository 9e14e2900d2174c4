"""Issue 12's acceptance: worker processes of one run, sharing its state in PostgreSQL and its
output in S3 (moto), against one emulator with an unannounced rate limit and injected faults,
while one worker after another is killed with SIGKILL and started again.

Every job succeeds once, each object under images/ is the image its success recorded (by
sha256), the emulator never accepted more than its token bucket allows (the workers' shared
pace kept it), confirmed spend is $0.03 an image, and what the emulator billed lies between the
confirmed spend and the confirmed plus possible spend. With ``--max-cost`` the emulator bills no
more than the cap across every worker. (The same with Ray actors: test_scaleout_ray.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import services
from tests.chaos import (
    books,
    chaos_emulator,
    check_every_job_once,
    run_with_kills,
)

pytestmark = pytest.mark.slow

BUDGET_EXCEEDED = 3  # the exit code of a run its budget stopped


def test_four_workers_killed_and_restarted_run_every_job_once_into_s3(
    tmp_path: Path, pg_url: str, s3_bucket: str
) -> None:
    emulator, out = chaos_emulator(), f"s3://{s3_bucket}/run"
    try:
        pool = run_with_kills(
            tmp_path, pg_url, emulator.url, out, jobs=2000, workers=4, timeout_s=900
        )
        assert pool.codes == [0, 0, 0, 0], pool.output()
        figures = check_every_job_once(emulator, out, pg_url, 2000, pool.kills)
        assert pool.kills >= 20  # a kill every 3-6 s for >= 200 s
        print(f"\n4 workers into S3: {figures}")  # shown by pytest -s, or -rP
    finally:
        emulator.stop()


def test_four_workers_with_a_budget_bill_no_more_than_it(tmp_path: Path, pg_url: str) -> None:
    emulator, out = chaos_emulator(), str(tmp_path / "out")
    try:
        pool = run_with_kills(
            tmp_path, pg_url, emulator.url, out, jobs=1000, workers=4,
            extra=["--max-cost", "15"], timeout_s=300,
        )  # fmt: skip
        assert pool.codes == [BUDGET_EXCEEDED] * 4, pool.output()
        assert emulator.billed_usd <= 15.0
        figures = books(emulator, out, pg_url, pool.kills)
        assert figures.confirmed_usd + figures.possible_usd <= 15.0 + 1e-9
        logs = "".join(path.read_text() for path in sorted((tmp_path / "logs").glob("*.log")))
        assert "the budget of $15.00 is reached" in logs, pool.output()
        assert services.PG_PASSWORD not in logs
        print(f"\n4 workers, --max-cost 15: {figures}")  # shown by pytest -s, or -rP
    finally:
        emulator.stop()
