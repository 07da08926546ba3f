"""Restore points: the three steps, the ordered restore, hooks, health checks, the drill, and rollback.py's commands."""
