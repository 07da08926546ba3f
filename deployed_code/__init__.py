"""The deployed code: tree snapshots, release layouts and the switch, git."""
