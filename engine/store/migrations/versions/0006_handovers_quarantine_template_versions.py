"""handovers, quarantine and template versions: bounded crash loss, fault isolation, last good templates

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import engine.store.models

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table(
        'handovers',
        sa.Column('worker', sa.String(length=64), nullable=False),
        sa.Column('channel', sa.String(length=16), nullable=False),
        sa.Column('first_id', _BIG_ID, nullable=False),
        sa.Column('last_id', _BIG_ID, nullable=False),
        sa.Column('position', sa.String(length=200), nullable=True),
        sa.Column('handed_at', engine.store.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('worker', name=op.f('pk_handovers')),
    )
    op.create_table(
        'quarantine',
        sa.Column('id', _BIG_ID, autoincrement=True, nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('ref', sa.String(length=64), nullable=False),
        sa.Column('journey_id', sa.String(length=64), nullable=True),
        sa.Column('journey_version', sa.Integer(), nullable=True),
        sa.Column('member_id', sa.String(length=64), nullable=True),
        sa.Column('step', sa.String(length=64), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('error', sa.Text(), nullable=False),
        sa.Column('detail', sa.Text(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('first_failed_at', engine.store.models.UTCDateTime(), nullable=False),
        sa.Column('last_failed_at', engine.store.models.UTCDateTime(), nullable=False),
        sa.Column('next_attempt_at', engine.store.models.UTCDateTime(), nullable=True),
        sa.Column('settled_at', engine.store.models.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_quarantine')),
        sa.UniqueConstraint('kind', 'ref', name=op.f('uq_quarantine_kind_ref')),
    )
    with op.batch_alter_table('quarantine', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_quarantine_status'), ['status'], unique=False)
    op.create_table(
        'template_versions',
        sa.Column('id', _BIG_ID, autoincrement=True, nullable=False),
        sa.Column('path', sa.String(length=300), nullable=False),
        sa.Column('checksum', sa.String(length=64), nullable=False),
        sa.Column('source', sa.Text(), nullable=False),
        sa.Column('created_at', engine.store.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_template_versions')),
        sa.UniqueConstraint('path', 'checksum', name=op.f('uq_template_versions_path_checksum')),
    )
    # Adding a column with a constant default is a change to the table's description on both databases, not a
    # rewrite of its rows: instant on a million enrollments.
    with op.batch_alter_table('enrollments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('failures', sa.Integer(), server_default=sa.text('0'), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('enrollments', schema=None) as batch_op:
        batch_op.drop_column('failures')
    op.drop_table('template_versions')
    with op.batch_alter_table('quarantine', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_quarantine_status'))
    op.drop_table('quarantine')
    op.drop_table('handovers')
