"""webhook receipts, sms segments, provider id index

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 01:24:06.658498
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import engine.store.models


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('webhook_receipts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('provider', sa.String(length=32), nullable=False),
    sa.Column('event_key', sa.String(length=200), nullable=False),
    sa.Column('received_at', engine.store.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_receipts')),
    sa.UniqueConstraint('provider', 'event_key', name=op.f('uq_webhook_receipts_provider_event_key'))
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('segments', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('encoding', sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column('category', sa.String(length=16), server_default='marketing', nullable=False))
        batch_op.create_index(batch_op.f('ix_messages_provider_id'), ['provider_id'], unique=False)




def downgrade() -> None:

    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_messages_provider_id'))
        batch_op.drop_column('category')
        batch_op.drop_column('encoding')
        batch_op.drop_column('segments')

    op.drop_table('webhook_receipts')

