"""sealed points ledger: points_ledger.mac (chained per member), members.points_mac

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 13:30:00

Ledger rows written before this revision have no seal; `audit verify` accepts them only before a member's first
sealed row.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('points_ledger', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mac', sa.String(length=64), nullable=True))
    with op.batch_alter_table('members', schema=None) as batch_op:
        batch_op.add_column(sa.Column('points_mac', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('members', schema=None) as batch_op:
        batch_op.drop_column('points_mac')
    with op.batch_alter_table('points_ledger', schema=None) as batch_op:
        batch_op.drop_column('mac')
