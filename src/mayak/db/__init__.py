"""Storage: schema, engine set-up for SQLite and PostgreSQL, and Alembic migrations."""
