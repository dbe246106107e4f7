"""Calls in flight per key, one ledger row per call, and who owns stored objects.

- `client_keys.max_in_flight`: how many calls a key may have open at once.
- `usage.call_id`: the id the gateway gave the call when it admitted it;
  unique, so a row written by a replica that recovers a dead replica's call
  and the row the call wrote itself can never both land.
- `owners`: which key created each stored response or conversation.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("client_keys") as batch:
        batch.add_column(sa.Column("max_in_flight", sa.Integer, nullable=True))
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("call_id", sa.String(40), nullable=True))
    op.create_index("ux_usage_call_id", "usage", ["call_id"], unique=True)
    op.create_table(
        "owners",
        sa.Column("object_id", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("owners")
    op.drop_index("ux_usage_call_id", "usage")
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("call_id")
    with op.batch_alter_table("client_keys") as batch:
        batch.drop_column("max_in_flight")
