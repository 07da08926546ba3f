"""Roles, their memberships and settings, and tablespaces: what a database needs of its cluster and pg_dump
leaves out. Every backup keeps them as `pg_dumpall --globals-only` wrote them (globals.sql, checksummed by the
manifest like the dump).
"""

from __future__ import annotations

import os
import sys

from backup_store.manifest import Backup
from backup_store.staging import Staging
from common.errors import ToolkitError
from common.files import PRIVATE_FILE
from database.backup_info import DbBackupInfo
from database.context import SCRIPT
from database.dumps import PgTools, with_full_disk_named
from database.server import DbServer

GLOBALS_FILE = "globals.sql"
_PERMISSION_DENIED = "permission denied"  # pg_dumpall's error when DB_USER may not read a catalog


def keep_globals(staging: Staging, server: DbServer, tools: PgTools, role_passwords: bool) -> None:
    """pg_dumpall --globals-only into the backup being built, and whether it holds them in its metadata.

    Without the privilege to read them (a non-superuser asking for passwords) the backup goes on without
    them, with a warning; any other failure fails the backup, as pg_dump's would."""
    path = staging.path / GLOBALS_FILE
    # Made 0600 before pg_dumpall writes into it: with passwords it holds their hashes.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
    argv = [tools.path("pg_dumpall"), "--globals-only", "--quote-all-identifiers", "--encoding=UTF8",
            f"--file={path}", "--no-password"]
    if not role_passwords:
        argv.append("--no-role-passwords")  # reads pg_roles, which every role may, not pg_authid
    result = server.run_client(argv, "pg_dumpall --globals-only", check=False)
    if result.returncode != 0:
        path.unlink()
        last = (result.stderr.strip().splitlines() or ["no error message"])[0]
        if _PERMISSION_DENIED not in result.stderr:
            raise with_full_disk_named(ToolkitError(f"pg_dumpall --globals-only failed: {last}"),
                                       f"the backup folder {staging.path.parent} (BACKUP_DIR)")
        # take_backup has no Context (safety backups are taken inside other commands): ctx.warn's line.
        print(f"{SCRIPT}: warning: the backup keeps no roles or tablespaces: {server.user} may not read them "
              f"({last}){'; try without --with-role-passwords' if role_passwords else ''}",
              file=sys.stderr, flush=True)
        DbBackupInfo.set_in(staging.extra, has_globals=False, role_passwords=False)
        return
    staging.adopt(GLOBALS_FILE)
    DbBackupInfo.set_in(staging.extra, has_globals=True, role_passwords=role_passwords)


def globals_summary(backup: Backup) -> str:
    """One line saying what a backup keeps of its cluster's roles and tablespaces."""
    info = DbBackupInfo.load(backup)
    if not info.has_globals:
        return "roles and tablespaces: not kept" + (" (taken before they were)" if info.has_globals is None else "")
    if info.role_passwords:
        return f"roles and tablespaces: kept in {GLOBALS_FILE}, with the roles' password hashes (mode 0600)"
    return f"roles and tablespaces: kept in {GLOBALS_FILE}, without passwords"
