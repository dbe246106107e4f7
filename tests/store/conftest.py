"""Store fixtures: the PostgreSQL database of tests/keys, for the store tests too."""

from __future__ import annotations

from tests.keys.conftest import postgres_url  # noqa: F401  (a fixture, shared)
