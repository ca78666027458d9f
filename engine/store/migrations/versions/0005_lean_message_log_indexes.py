"""message log: fewer index entries per message on the send path

The at-most-once check probes the unique key's own index (journey, enrollment_id, step), so the separate
index on enrollment_id goes; the provider_id index only holds rows that have a provider id.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 19:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_HAS_PROVIDER_ID = sa.text("provider_id IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_messages_enrollment_id'))
        batch_op.drop_index(batch_op.f('ix_messages_provider_id'))
        batch_op.create_index('ix_messages_provider_id', ['provider_id'], unique=False,
                              sqlite_where=_HAS_PROVIDER_ID, postgresql_where=_HAS_PROVIDER_ID)


def downgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_provider_id')
        batch_op.create_index(batch_op.f('ix_messages_provider_id'), ['provider_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_messages_enrollment_id'), ['enrollment_id'], unique=False)
