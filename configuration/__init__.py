"""The configuration folder and .env: formats, merge patch, checks, backup and restore."""
