"""Per-client cards and feedback, and widths that fit the request schema (branch sec-state, issue 10).

* ``cds_issued_card.client_id`` and ``cds_feedback.client_id``: the client (JWT ``iss``, or "open") a card was
  sent to / feedback came from. Rows from before are "open" (so JWT clients cannot send feedback for them).
* ``cds_issued_card.hook_instance``: 64 -> 200 characters (the request schema's hookInstance maxLength).
* ``cds_used_jti.jti`` holds the SHA-256 hex of the JWT id (store.jti_key) instead of the id itself: the ids
  recorded before are hashed, so a token used just before the upgrade is still refused after it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""
from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cds_issued_card") as batch:
        batch.add_column(sa.Column("client_id", sa.String(2048), nullable=False, server_default="open"))
        batch.alter_column("hook_instance", existing_type=sa.String(64), type_=sa.String(200),
                           existing_nullable=False)
    with op.batch_alter_table("cds_feedback") as batch:
        batch.add_column(sa.Column("client_id", sa.String(2048), nullable=False, server_default="open"))
    used = sa.table("cds_used_jti", sa.column("jti", sa.String), sa.column("expires_at"))
    bind = op.get_bind()
    rows = bind.execute(sa.select(used.c.jti, used.c.expires_at)).all()  # small: ids expire within minutes
    if rows:
        bind.execute(used.delete())
        hashed = {hashlib.sha256(jti.encode("utf-8", "surrogatepass")).hexdigest(): expires for jti, expires in rows}
        bind.execute(used.insert(), [{"jti": k, "expires_at": v} for k, v in hashed.items()])


def downgrade() -> None:  # (the hashed JWT ids stay hashed: they expire within minutes anyway)
    with op.batch_alter_table("cds_feedback") as batch:
        batch.drop_column("client_id")
    with op.batch_alter_table("cds_issued_card") as batch:
        batch.alter_column("hook_instance", existing_type=sa.String(200), type_=sa.String(64),
                           existing_nullable=False)
        batch.drop_column("client_id")
