"""PostgreSQL: the server, dumps, the swap restore, migrations, sessions, checks."""
