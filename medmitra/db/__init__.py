"""Database: tortoise config, connection lifecycle and migrations."""
