"""Shared fixtures for the test suite."""

from __future__ import annotations

import itertools
import re
import signal
from collections.abc import Iterator

import pytest
from helpers import stop_script_server
from pg_cluster import Database, ServerBinariesNotFound, ThrowawayCluster
from s3_server import Bucket, LocalS3


def pytest_configure() -> None:
    """A suite started in the background by a shell without job control inherits SIGINT ignored, and so
    would every script it starts (Python keeps an ignored SIGINT ignored): the tests of ^C could then never
    stop one. The scripts the tests start get SIGINT as a terminal would deliver it."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish() -> None:
    """This test process's script server (see run_script) ends with its tests."""
    stop_script_server()

# ---------------------------------------------------------------------------------------------------------
# PostgreSQL: one throwaway cluster per session, one fresh database per test.
# ---------------------------------------------------------------------------------------------------------

_database_numbers = itertools.count(1)
MAX_IDENTIFIER_LENGTH = 63  # PostgreSQL truncates longer names, which could make two tests collide


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[ThrowawayCluster]:
    """The session's PostgreSQL server, started the first time a test asks for it."""
    try:
        cluster = ThrowawayCluster()
    except ServerBinariesNotFound as missing:
        # Stop the whole run: a suite that skips its database tests would look green while testing nothing.
        pytest.exit(str(missing), returncode=1)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_db(request: pytest.FixtureRequest, pg_cluster: ThrowawayCluster) -> Iterator[Database]:
    """An empty database for this test only (`name`, `env`, `connect()`), dropped afterwards."""
    test_name = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower()).strip("_")
    name = f"t_{next(_database_numbers)}_{test_name}"[:MAX_IDENTIFIER_LENGTH]
    database = pg_cluster.create_database(name)
    yield database
    pg_cluster.drop_database(name)


# ---------------------------------------------------------------------------------------------------------
# S3: one rclone server per session, one fresh bucket per test.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    """The session's S3-compatible server (rclone serve s3 on 127.0.0.1), started when a test first asks."""
    server = LocalS3(tmp_path_factory.mktemp("s3-root"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def remote(s3_server: LocalS3) -> Bucket:
    """A new bucket for this test, with the REMOTE_URL/S3_ENDPOINT_URL/AWS_* settings that point at it."""
    return Bucket(s3_server)
