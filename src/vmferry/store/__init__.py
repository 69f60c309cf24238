"""The controller's store: SQLAlchemy over SQLite (default) or PostgreSQL."""
