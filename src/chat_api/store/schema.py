"""The tables. Changes go through a new Alembic migration in `chat_api/migrations`."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
)

metadata = MetaData()

client_keys = Table(
    "client_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("prefix", String(16), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("models", Text, nullable=False, default=""),
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("max_in_flight", Integer, nullable=True),
    Column("budget_usd", Numeric(18, 6), nullable=True),
    Column("budget_period", String(16), nullable=True),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

usage = Table(
    "usage",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("key_id", String(32), nullable=True),
    Column("endpoint", String(64), nullable=False),
    Column("model", String(128), nullable=False),
    Column("streamed", Boolean, nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("estimated", Boolean, nullable=False),
    Column("cost_usd", Numeric(18, 8), nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float, nullable=True),
    Column("request_id", String(128), nullable=False),
    Column("upstream_request_id", String(128), nullable=True),
    Column("call_id", String(40), nullable=True),
    Index("ix_usage_key_at", "key_id", "at"),
    Index("ix_usage_at", "at"),
    Index("ux_usage_call_id", "call_id", unique=True),
)

# Which key created each stored response or conversation (None: the master key or keys off).
owners = Table(
    "owners",
    metadata,
    Column("object_id", String(128), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("key_id", String(32), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Images and PDF pages the object's context holds, read again when it is continued.
    Column("media", Integer, nullable=False, server_default="0"),
)
