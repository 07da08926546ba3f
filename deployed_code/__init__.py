"""The deployed code: its commands (backups, restore, rollback, verify, cleanup) over its paths and source
metadata, tree snapshots, release layouts and the switch, git."""
