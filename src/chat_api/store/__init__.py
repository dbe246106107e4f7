"""Storage: client keys and the usage ledger, in SQLite (embedded) or PostgreSQL (shared)."""
