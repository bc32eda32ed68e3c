"""Baseline: the store's schema as store.py created it before migrations (main, 2026-12-01).

Idempotent, so that `db upgrade` adopts a store made before revisions were recorded: each table (and its
indexes) is created only when missing. A store made before ``cds_override`` existed gets it filled from its
recorded "overridden" feedback (what store.py did at start before this revision).

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from cds_hooks_service.store import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _missing(name: str) -> bool:
    return not sa.inspect(op.get_bind()).has_table(name)


def upgrade() -> None:
    if _missing("cds_issued_card"):
        op.create_table(
            "cds_issued_card",
            sa.Column("card_uuid", sa.String(64), primary_key=True),
            sa.Column("rule_id", sa.String(200), nullable=False),
            sa.Column("service_id", sa.String(200), nullable=False),
            sa.Column("hook_instance", sa.String(64), nullable=False),
            sa.Column("indicator", sa.String(16), nullable=False),
            sa.Column("mode", sa.String(16), nullable=False),
            sa.Column("suppression_key", sa.String(128), nullable=False),
            sa.Column("issued_at", UTCDateTime(), nullable=False),
        )
        op.create_index("ix_cds_issued_card_suppression_key", "cds_issued_card", ["suppression_key"])
        op.create_index("ix_cds_issued_card_rule_issued", "cds_issued_card", ["rule_id", "issued_at"])
    if _missing("cds_feedback"):
        op.create_table(
            "cds_feedback",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("card_uuid", sa.String(64), nullable=False),
            sa.Column("service_id", sa.String(200), nullable=False),
            sa.Column("rule_id", sa.String(200), nullable=True),
            sa.Column("outcome", sa.String(16), nullable=False),
            sa.Column("override_system", sa.String(500)),
            sa.Column("override_code", sa.String(200)),
            sa.Column("override_display", sa.String(500)),
            sa.Column("has_comment", sa.Boolean, nullable=False),
            sa.Column("accepted_suggestions", sa.Text, nullable=False),
            sa.Column("outcome_timestamp", UTCDateTime(), nullable=False),
            sa.Column("received_at", UTCDateTime(), nullable=False),
            sa.UniqueConstraint("card_uuid", "outcome", "outcome_timestamp", name="uq_cds_feedback_card_outcome_ts"),
        )
        op.create_index("ix_cds_feedback_card_uuid", "cds_feedback", ["card_uuid"])
    if _missing("cds_override"):
        op.create_table(
            "cds_override",
            sa.Column("card_uuid", sa.String(64), primary_key=True),
            sa.Column("suppression_key", sa.String(128), nullable=False),
            sa.Column("issued_at", UTCDateTime(), nullable=False),
        )
        op.create_index("ix_cds_override_key_issued", "cds_override", ["suppression_key", "issued_at"])
        op.execute(
            "INSERT INTO cds_override (card_uuid, suppression_key, issued_at) "
            "SELECT card_uuid, suppression_key, issued_at FROM cds_issued_card WHERE card_uuid IN "
            "(SELECT card_uuid FROM cds_feedback WHERE outcome = 'overridden')")
    if _missing("cds_used_jti"):
        op.create_table(
            "cds_used_jti",
            sa.Column("jti", sa.String(255), primary_key=True),
            sa.Column("expires_at", UTCDateTime(), nullable=False),
        )
        op.create_index("ix_cds_used_jti_expires_at", "cds_used_jti", ["expires_at"])


def downgrade() -> None:
    for table in ("cds_used_jti", "cds_override", "cds_feedback", "cds_issued_card"):
        op.drop_table(table)
