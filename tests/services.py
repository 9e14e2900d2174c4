"""Real services on loopback for the scale-out tests, started and stopped by the tests themselves.

- :func:`start_postgres`: Debian's PostgreSQL, a fresh ``initdb`` cluster in a temp folder on a
  free port (run as the ``postgres`` user when the tests run as root, as PostgreSQL refuses
  root). Local connections trust; TCP connections need the password, so that the tests can
  check a password in a ``--state`` URL never shows up anywhere the runner writes.
- :func:`start_moto`: moto's S3 server (``moto.server.ThreadedMotoServer``) on a free port;
  ``AWS_ENDPOINT_URL`` points the standard credential chain at it.

``make test`` installs Debian's ``postgresql`` when it is missing (see the Makefile); a machine
without it fails these tests with a message saying so, never skips them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PG_PASSWORD = "pg-secret-4f7a9c"  # a test cluster's; a test greps every output for it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_bin() -> Path:
    """The folder of Debian's PostgreSQL server programs (the newest installed)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed: `make test` installs Debian's postgresql "
            "(apt-get install postgresql), or install it yourself"
        )
    return found[-1].parent


@dataclass
class Postgres:
    """A running test cluster; :meth:`url` of a database in it, :meth:`new_database`."""

    port: int
    data: Path
    admin_url: str  # the superuser, over TCP with the password

    def url(self, database: str = "postgres", *, password: bool = True) -> str:
        secret = f":{PG_PASSWORD}" if password else ""
        return f"postgresql://postgres{secret}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL (with the password)."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_postgres() -> tuple[list[str], int | None]:
    """The command prefix and uid to run the server's programs with: as root, the
    ``postgres`` user (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return [], None
    user = pwd.getpwnam("postgres")
    return ["runuser", "-u", "postgres", "--"], user.pw_uid


@contextlib.contextmanager
def start_postgres(*, durable: bool = False) -> Iterator[Postgres]:
    """A fresh cluster in a temp folder on a free port, stopped and removed afterwards. The
    tests' cluster skips fsync (they kill workers, never the server); a ``durable`` one, for
    the benchmarks, commits as a production server does."""
    bin_dir = postgres_bin()
    prefix, uid = _as_postgres()
    root = Path(tempfile.mkdtemp(prefix="ir-pg-"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    pwfile = root / "pw"
    pwfile.write_text(PG_PASSWORD + "\n")
    if uid is not None:
        for path in (root, sockets, pwfile):
            os.chown(path, uid, -1)
    port = free_port()
    try:
        subprocess.run(
            [
                *prefix,
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sockets} "
            "-c max_connections=200 -c shared_buffers=128MB"
        )
        if not durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        subprocess.run(
            [
                *prefix,
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "-l",
                str(root / "log"),
                "start",
            ],
            check=True,
            capture_output=True,
        )
        server = Postgres(port, data, "")
        server.admin_url = server.url()
        _wait_ready(server.admin_url)
        yield server
    except subprocess.CalledProcessError as exc:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr!r}\n{log}") from exc
    finally:
        subprocess.run(
            [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(url: str, timeout_s: float = 30.0) -> None:
    import psycopg

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@dataclass
class Moto:
    """moto's S3 server: its endpoint URL, and :meth:`new_bucket`."""

    endpoint: str

    def new_bucket(self) -> str:
        import boto3

        name = f"b-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(
            Bucket=name
        )
        return name


@contextlib.contextmanager
def start_moto() -> Iterator[Moto]:
    """moto's S3 server on a free loopback port, with fake credentials in the environment
    (the standard chain reads them) and ``AWS_ENDPOINT_URL`` pointing at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing-key-id",
        AWS_SECRET_ACCESS_KEY="testing-secret-key-5d2e",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    try:
        yield Moto(endpoint)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@contextlib.contextmanager
def start_ray_cluster(lease_s: str) -> Iterator[Any]:
    """A local Ray cluster of two nodes of 2 CPUs each (``ray.cluster_utils.Cluster``),
    shut down at the end. Its actors' processes inherit this process's environment from the
    nodes: moto's ``AWS_*`` when its server runs, and ``RUNNER_LEASE_S`` set to ``lease_s``."""
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as env:
        env.setenv("RUNNER_LEASE_S", lease_s)
        # The head's dashboard agent takes a fixed port unless told: free, as another test
        # process (pytest -n) may run a cluster of its own.
        head = {
            "num_cpus": 2,
            "include_dashboard": False,
            "dashboard_agent_listen_port": free_port(),
        }
        cluster: Any = Cluster(initialize_head=True, head_node_args=head)  # ray is untyped
        try:
            cluster.add_node(num_cpus=2)
            yield cluster
        finally:
            cluster.shutdown()
