"""How many images and PDF pages each stored response and conversation holds.

A response that continues stored context (`previous_response_id`,
`conversation`) has it read again, and billed again: its images at the
model's image figure, past the context window. `owners.media` keeps the
count so the call can be reserved for them. Objects stored before this
revision count none (nothing is known of them).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("owners") as batch:
        batch.add_column(sa.Column("media", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("owners") as batch:
        batch.drop_column("media")
