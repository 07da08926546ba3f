"""What a swap restore must carry over besides the content: database-level properties, logical replication
subscriptions, and the privileges it needs, checked before pg_restore runs. Against the real cluster."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import database_state, run_script
from pg_cluster import Database, ThrowawayCluster
from test_database_rollback import RICH_SCHEMA, DbWorkspace, break_database

from common.settings import Settings
from database.dumps import rename_back_statements
from database.scratch import KEPT, drop_database, scratch_name
from database.server import DbServer

PROPERTIES = ("SELECT t.spcname, d.datconnlimit, d.datistemplate, shobj_description(d.oid, 'pg_database'),"
              " d.datlocprovider, d.daticulocale, d.datcollate FROM pg_database d"
              " JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE d.datname = '{}'")


@pytest.fixture
def dbw(pg_db, tmp_path: Path) -> DbWorkspace:
    workspace = DbWorkspace(pg_db, tmp_path)
    workspace.sql(RICH_SCHEMA)
    return workspace


def until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Wait for a condition of the server (replication catching up), polling it."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def kept_databases(dbw: DbWorkspace) -> list[str]:
    return sorted(name for name in dbw.databases() if name.startswith(dbw.pg_db.name[:30]) and "__before_" in name)


def drop_kept(dbw: DbWorkspace) -> None:
    for name in kept_databases(dbw):
        dbw.sql(f'ALTER DATABASE "{name}" IS_TEMPLATE false', dbname="postgres")
        dbw.pg_db.cluster.drop_database(name)


@pytest.fixture
def tablespace(dbw: DbWorkspace) -> Iterator[str]:
    """A real tablespace in a folder of its own; the test's databases are dropped before it is."""
    name = "fastdisk_" + secrets.token_hex(4)
    dbw.sql(f"CREATE TABLESPACE {name} LOCATION '{dbw.pg_db.cluster.server_folder('fastdisk-')}'")
    yield name
    for (database,) in dbw.sql(f"SELECT d.datname FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace"
                               f" WHERE t.spcname = '{name}'", dbname="postgres"):
        dbw.sql(f'ALTER DATABASE "{database}" IS_TEMPLATE false', dbname="postgres")
        dbw.pg_db.cluster.drop_database(database)
    dbw.sql(f"DROP TABLESPACE {name}", dbname="postgres")


def test_a_swap_keeps_the_tablespace_connection_limit_template_flag_and_comment(dbw: DbWorkspace, tablespace: str):
    live = dbw.pg_db.name
    dbw.sql(f'ALTER DATABASE "{live}" SET TABLESPACE {tablespace}', dbname="postgres")
    dbw.sql(f'ALTER DATABASE "{live}" WITH CONNECTION LIMIT 7 IS_TEMPLATE true')
    dbw.sql(f"COMMENT ON DATABASE \"{live}\" IS 'orders: do not drop'")
    properties = dbw.sql(PROPERTIES.format(live))
    assert properties[0][:4] == (tablespace, 7, True, "orders: do not drop")
    state = database_state(dbw.pg_db)
    assert dbw.run("backup").returncode == 0
    break_database(dbw)

    result = dbw.run("--json", "restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert database_state(dbw.pg_db) == state
    assert dbw.sql(PROPERTIES.format(live)) == properties
    # The kept database is a template too, and cleanup still drops it (a template cannot be dropped as such).
    previous = json.loads(result.stdout)["previous_database"]
    assert dbw.run("restore", "latest", "--yes").returncode == 0
    cleaned = dbw.run("--json", "cleanup", "0", "--keep", "1")
    assert cleaned.returncode == 0, cleaned.stderr
    assert previous in json.loads(cleaned.stdout)["dropped_databases"]
    assert previous not in dbw.databases()
    dbw.sql(f'ALTER DATABASE "{live}" IS_TEMPLATE false')


def test_a_swap_keeps_an_icu_locale(dbw: DbWorkspace):
    cluster = dbw.pg_db.cluster
    name = dbw.pg_db.name[:40] + "_icu"
    dbw.sql(f"CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'de-DE'")
    try:
        icu = DbWorkspace(Database(name, cluster), dbw.root)
        icu.sql("CREATE TABLE words (w text); INSERT INTO words VALUES ('a'), ('B'), ('ä'), ('z')")
        properties = icu.sql(PROPERTIES.format(name))
        assert properties[0][4:6] == ("i", "de-DE")
        ordered = icu.sql("SELECT w FROM words ORDER BY w")
        assert icu.run("backup").returncode == 0
        result = icu.run("restore", "latest", "--yes")
        assert result.returncode == 0, result.stderr
        assert icu.sql(PROPERTIES.format(name)) == properties
        assert icu.sql("SELECT w FROM words ORDER BY w") == ordered  # ICU's order, not the C locale's
    finally:
        for database in [d for d in dbw.databases() if d.startswith(name)]:
            cluster.drop_database(database)


# -- logical replication -----------------------------------------------------------------------------------


class Replication:
    """A publisher database with a table `feed` published, its slots, and the subscriptions made to it."""

    def __init__(self, cluster: ThrowawayCluster, publisher: Database):
        self.cluster = cluster
        self.publisher = publisher
        self.slots: list[str] = []

    def sql(self, dbname: str, statement: str) -> list:
        return self.cluster.query(dbname, statement)

    def slot(self) -> str:
        """A logical slot on the publisher, made apart from CREATE SUBSCRIPTION (same cluster)."""
        name = "slot_" + secrets.token_hex(4)
        self.sql(self.publisher.name, f"SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')")
        self.slots.append(name)
        return name

    def subscribe(self, dbname: str, subscription: str, slot: str) -> None:
        self.sql(dbname, "CREATE TABLE IF NOT EXISTS feed (id int PRIMARY KEY, note text)")
        self.sql(dbname, f"CREATE SUBSCRIPTION {subscription} CONNECTION 'host={self.cluster.host} "
                         f"port={self.cluster.port} dbname={self.publisher.name} user={self.cluster.user}' "
                         f"PUBLICATION feed WITH (create_slot = false, slot_name = '{slot}')")

    def publish(self, *ids: int) -> None:
        self.sql(self.publisher.name, "INSERT INTO feed SELECT i, 'row ' || i FROM unnest(ARRAY"
                                      f"{list(ids)}::int[]) i")

    def feed(self, dbname: str) -> list[int]:
        return [row[0] for row in self.sql(dbname, "SELECT id FROM feed ORDER BY id")]

    def subscriptions(self) -> list[tuple]:
        """(database, subscription, enabled, slot) of every subscription in the cluster."""
        return self.sql("postgres", "SELECT d.datname, s.subname, s.subenabled, s.subslotname FROM pg_subscription s"
                                    " JOIN pg_database d ON d.oid = s.subdbid ORDER BY 1, 2")

    def tear_down(self) -> None:
        for database, subscription, _enabled, _slot in self.subscriptions():
            self.sql(database, f"ALTER SUBSCRIPTION {subscription} DISABLE")
            self.sql(database, f"ALTER SUBSCRIPTION {subscription} SET (slot_name = NONE)")
            self.sql(database, f"DROP SUBSCRIPTION {subscription}")
        for slot in self.slots:
            until(lambda slot=slot: not self.sql("postgres", "SELECT 1 FROM pg_replication_slots"
                                                             f" WHERE slot_name = '{slot}' AND active"),
                  f"slot {slot} let go")
            self.sql("postgres", f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                                 f" WHERE slot_name = '{slot}'")


@pytest.fixture
def replication(dbw: DbWorkspace) -> Iterator[Replication]:
    cluster = dbw.pg_db.cluster
    publisher = cluster.create_database(dbw.pg_db.name[:40] + "_pub")
    made = Replication(cluster, publisher)
    made.sql(publisher.name, "CREATE TABLE feed (id int PRIMARY KEY, note text);"
                             " CREATE PUBLICATION feed FOR TABLE feed")
    try:
        yield made
    finally:
        made.tear_down()
        drop_kept(dbw)
        cluster.drop_database(publisher.name)


def test_a_swap_hands_the_subscription_over_and_cleanup_drops_the_kept_database(dbw: DbWorkspace,
                                                                                 replication: Replication):
    live = dbw.pg_db.name
    slot = replication.slot()
    replication.publish(1, 2, 3)
    replication.subscribe(live, "orders_feed", slot)
    until(lambda: replication.feed(live) == [1, 2, 3], "the initial copy")
    assert dbw.run("backup").returncode == 0
    replication.publish(4)
    until(lambda: replication.feed(live) == [1, 2, 3, 4], "row 4 replicated")

    result = dbw.run("--json", "restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["subscriptions_handed_over"] == ["orders_feed"]
    kept = report["previous_database"]
    assert set(replication.subscriptions()) == {(live, "orders_feed", True, slot), (kept, "orders_feed", False, None)}
    replication.publish(5)
    # The restored database goes on from the slot: row 4 came after the backup, so it is not in the restored data.
    until(lambda: replication.feed(live) == [1, 2, 3, 5], "row 5 replicated into the restored database")
    assert replication.feed(kept) == [1, 2, 3, 4]  # the replaced database no longer receives anything
    verify = dbw.run("verify")
    assert verify.returncode == 0, verify.stdout

    # A second restore keeps a second database; cleanup drops the first, which still has its subscription.
    assert dbw.run("restore", "latest", "--yes").returncode == 0
    until(lambda: replication.feed(live) == [1, 2, 3], "the second restore is live")
    replication.publish(6)
    until(lambda: replication.feed(live) == [1, 2, 3, 6], "row 6 replicated after the second restore")
    kept_now = kept_databases(dbw)
    assert len(kept_now) == 2 and {row[0] for row in replication.subscriptions()} == {live, *kept_now}
    cleaned = dbw.run("--json", "cleanup", "0", "--keep", "1")
    assert cleaned.returncode == 0, cleaned.stderr  # it was ObjectInUse: a database with a subscription
    dropped = json.loads(cleaned.stdout)["dropped_databases"]
    assert len(dropped) == 1 and dropped[0] in kept_now and dropped[0] not in dbw.databases()
    slots = replication.sql("postgres", f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'")
    assert slots == [(1,)]  # the live database's subscription streams from it


def test_a_publication_grown_since_the_last_refresh_is_refused_and_the_built_database_dropped(
        dbw: DbWorkspace, replication: Replication):
    live = dbw.pg_db.name
    for database in (live, replication.publisher.name):
        replication.sql(database, "CREATE TABLE feed_more (id int PRIMARY KEY)")
    replication.subscribe(live, "orders_feed", replication.slot())
    until(lambda: replication.sql(live, "SELECT bool_and(srsubstate = 'r') FROM pg_subscription_rel") == [(True,)],
          "the initial copy done")
    replication.sql(replication.publisher.name, "ALTER PUBLICATION feed ADD TABLE feed_more")  # no REFRESH yet
    assert dbw.run("backup").returncode == 0
    state, databases = database_state(dbw.pg_db), dbw.databases()

    result = dbw.run("restore", "latest", "--yes")
    assert result.returncode == 1
    assert f"the publications of subscription orders_feed of {live} now hold tables it has not taken in (feed_more)" \
        in result.stderr
    assert f"ALTER SUBSCRIPTION orders_feed REFRESH PUBLICATION in {live} first" in result.stderr
    assert database_state(dbw.pg_db) == state
    assert dbw.databases() == databases  # the database built, with its subscription, was dropped
    assert [row[:2] for row in replication.subscriptions()] == [(live, "orders_feed")]


def test_the_undo_hands_the_subscription_back_to_the_replaced_database(dbw: DbWorkspace, replication: Replication):
    live = dbw.pg_db.name
    slot = replication.slot()
    replication.publish(1)
    replication.subscribe(live, "orders_feed", slot)
    until(lambda: replication.feed(live) == [1], "the initial copy")
    assert dbw.run("backup").returncode == 0
    replication.publish(2)
    until(lambda: replication.feed(live) == [1, 2], "row 2 replicated")
    result = dbw.run("--json", "restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    # The undo as printed: the hand-back statements in the live database around the renames.
    for statement in report["undo_subscriptions"]["before_renames"]:
        replication.sql(live, statement)
    for statement in rename_back_statements(live, report["previous_database"]):
        replication.sql("postgres", statement)
    for statement in report["undo_subscriptions"]["after_renames"]:
        replication.sql(live, statement)

    replication.publish(3)
    until(lambda: replication.feed(live) == [1, 2, 3], "row 3 replicated into the database put back")
    assert [(db, enabled, slot_name) for db, _name, enabled, slot_name in replication.subscriptions()
            if db == live] == [(live, True, slot)]
    undone = [db for db, *_ in replication.subscriptions() if "__undone_" in db]
    assert [(enabled, slot_name) for db, _name, enabled, slot_name in replication.subscriptions()
            if db in undone] == [(False, None)]
    # What the undo set aside refuses connections, as the swap left it; dropping it drops its subscription first.
    server = DbServer.from_settings(Settings.load(None, environ=dbw.env))
    for name in undone:
        assert "dropped subscription orders_feed" in drop_database(server, name)[0]
    assert name not in dbw.databases()


def test_cleanup_drops_a_kept_database_whose_subscription_still_streams(dbw: DbWorkspace, replication: Replication):
    live = dbw.pg_db.name
    # As restores before hand-overs left it: an old kept database whose subscription is still enabled, and a
    # newer one that cleanup keeps.
    old = scratch_name(live, KEPT, datetime(2020, 1, 1, tzinfo=UTC))
    dbw.sql(f'CREATE DATABASE "{old}"')
    dbw.sql(f'CREATE DATABASE "{scratch_name(live, KEPT, datetime(2021, 1, 1, tzinfo=UTC))}"')
    slot = replication.slot()
    replication.publish(1)
    replication.subscribe(old, "old_feed", slot)
    until(lambda: replication.feed(old) == [1], "the old kept database streaming")
    verify = dbw.run("--json", "verify")
    assert verify.returncode == 3
    assert [p for p in json.loads(verify.stdout)["problems"] if p.startswith(f"subscription old_feed of {old}, a "
                                                                             "database set aside, is enabled")]

    cleaned = dbw.run("--json", "cleanup", "0", "--keep", "1")
    assert cleaned.returncode == 0, cleaned.stderr  # it was ObjectInUse: a database with a subscription
    report = json.loads(cleaned.stdout)
    assert report["dropped_databases"] == [old]
    assert old not in dbw.databases()
    left = f"its slot {slot} stays on the publisher and no subscription here uses it"
    assert left in report["subscriptions_dropped"][0]


def test_a_publisher_with_a_logical_slot_is_refused_before_anything_is_built(dbw: DbWorkspace,
                                                                            replication: Replication):
    publisher = DbWorkspace(replication.publisher, dbw.root / "publisher")
    publisher.store.parent.mkdir()
    slot = replication.slot()
    assert publisher.run("backup").returncode == 0
    databases = dbw.databases()

    result = publisher.run("restore", "latest", "--yes")
    assert result.returncode == 1
    assert f"publishes through logical replication slots ({slot})" in result.stderr
    assert "nothing was changed" in result.stderr
    assert dbw.databases() == databases


def test_in_place_with_a_subscription_is_refused_before_the_safety_backup(dbw: DbWorkspace,
                                                                           replication: Replication):
    live = dbw.pg_db.name
    replication.subscribe(live, "orders_feed", replication.slot())
    assert dbw.run("backup").returncode == 0
    backups = dbw.backup_ids()
    state = database_state(dbw.pg_db)

    result = dbw.run("restore", "latest", "--in-place", "--yes")
    assert result.returncode == 1
    assert "has logical replication subscriptions (orders_feed)" in result.stderr
    assert "restore without --in-place" in result.stderr
    assert dbw.backup_ids() == backups  # no safety backup was taken for a restore that could not run
    assert database_state(dbw.pg_db) == state


# -- privileges ----------------------------------------------------------------------------------------------


@pytest.fixture
def role(dbw: DbWorkspace) -> Iterator[str]:
    name = "operator_" + secrets.token_hex(4)
    dbw.sql(f"CREATE ROLE {name} LOGIN")
    yield name
    for database in dbw.databases():
        if database.startswith(dbw.pg_db.name[:30]):
            dbw.sql(f'REVOKE ALL ON DATABASE "{database}" FROM {name}')
    dbw.sql(f"DROP ROLE {name}")


@pytest.mark.parametrize("grant, refusal", [
    ("CREATEDB", "may not switch databases: renaming {live} and creating its successor for its owner postgres"),
    ("NOCREATEDB", "may not create databases (no CREATEDB)"),
])
def test_missing_privileges_are_refused_before_pg_restore(dbw: DbWorkspace, role: str, grant: str, refusal: str):
    dbw.sql(f"ALTER ROLE {role} {grant}")
    assert dbw.run("backup").returncode == 0
    state, databases = database_state(dbw.pg_db), dbw.databases()

    result = run_script("database_rollback.py", "restore", "latest", "--yes", env={**dbw.env, "DB_USER": role},
                        cwd=dbw.root)
    assert result.returncode == 1
    assert refusal.format(live=dbw.pg_db.name) in result.stderr  # not pg_restore's or the server's own error
    assert "nothing was changed" in result.stderr
    assert database_state(dbw.pg_db) == state
    assert dbw.databases() == databases


def test_a_session_the_switch_could_not_end_is_refused_before_pg_restore(dbw: DbWorkspace, role: str):
    owner = role + "_owner"
    dbw.sql(f"CREATE ROLE {owner}; GRANT {owner} TO {role}; ALTER ROLE {role} CREATEDB")
    dbw.sql(f'ALTER DATABASE "{dbw.pg_db.name}" OWNER TO {owner}')
    assert dbw.run("backup").returncode == 0
    state, databases = database_state(dbw.pg_db), dbw.databases()
    superuser_session = dbw.pg_db.connect()  # only a superuser may end a superuser's session
    try:
        result = run_script("database_rollback.py", "restore", "latest", "--yes",
                            env={**dbw.env, "DB_USER": role}, cwd=dbw.root)
    finally:
        superuser_session.close()
        dbw.sql(f'ALTER DATABASE "{dbw.pg_db.name}" OWNER TO postgres; DROP ROLE {owner}')
    assert result.returncode == 1
    assert f"{role} could not end the sessions of postgres on {dbw.pg_db.name} at the switch" in result.stderr
    assert database_state(dbw.pg_db) == state
    assert dbw.databases() == databases
