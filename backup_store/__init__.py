"""The local backup store: manifests, staging, retention, locks, tree copy and hash."""
