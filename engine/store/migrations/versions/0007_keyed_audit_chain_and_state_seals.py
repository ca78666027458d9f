"""keyed audit chain and state seals: messages.state_mac, audit_head.keyed_from and mac, audit_anchors

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 13:00:00

Rows logged before this revision keep their unkeyed SHA-256 links: ``keyed_from`` is set past them, and
``audit verify`` reports them as written before the chain was keyed.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('state_mac', sa.String(length=64), nullable=True))
    with op.batch_alter_table('audit_head', schema=None) as batch_op:
        batch_op.add_column(sa.Column('keyed_from', _BIG_ID, nullable=True))
        batch_op.add_column(sa.Column('mac', sa.String(length=64), nullable=True))
    op.execute("UPDATE audit_head SET keyed_from = last_seq + 1")


def downgrade() -> None:
    with op.batch_alter_table('audit_head', schema=None) as batch_op:
        batch_op.drop_column('mac')
        batch_op.drop_column('keyed_from')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('state_mac')
