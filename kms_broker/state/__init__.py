"""Broker state: the ``Repository`` protocol and its SQLite implementation."""
