"""Broker state: the ``Repository`` protocol and its implementations, SQLite (``sqlite``, the
embedded default) and PostgreSQL (``postgres``, shared by broker replicas)."""
