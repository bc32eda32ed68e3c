"""The index on ``cds_issued_card.suppression_key`` dropped: no query reads issued cards by that key.

The override look-up of every order-sign call reads ``cds_override`` (its own index on suppression_key and
issued_at); issued cards are read by card uuid (feedback) or by rule and time (analytics). The dropped index
was written on every hook call that issued a card: one b-tree insert and, on SQLite, two of the card's
transaction's WAL page writes (BEGIN + INSERT + COMMIT 38 -> 28 us of CPU in a loop, bench/README.md, session 12).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""
from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_cds_issued_card_suppression_key", table_name="cds_issued_card")


def downgrade() -> None:
    op.create_index("ix_cds_issued_card_suppression_key", "cds_issued_card", ["suppression_key"])
