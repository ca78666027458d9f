"""loyalty programme: points ledger, tier review, member intelligence

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 03:16:11.926975
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import engine.store.models


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('programme_state',
    sa.Column('task', sa.String(length=32), nullable=False),
    sa.Column('ran_at', engine.store.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('task', name=op.f('pk_programme_state'))
    )
    op.create_table('points_ledger',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('member_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('points', sa.Integer(), nullable=False),
    sa.Column('occurred_at', engine.store.models.UTCDateTime(), nullable=False),
    sa.Column('expires_at', engine.store.models.UTCDateTime(), nullable=True),
    sa.Column('reason', sa.String(length=200), nullable=False),
    sa.Column('event_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('created_at', engine.store.models.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['member_id'], ['members.id'], name=op.f('fk_points_ledger_member_id_members'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_points_ledger'))
    )
    with op.batch_alter_table('points_ledger', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_points_ledger_member_id_expires_at'), ['member_id', 'expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_points_ledger_expires_at'), ['expires_at'], unique=False)

    with op.batch_alter_table('members', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_login_at', engine.store.models.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('tier_since', engine.store.models.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('tier_review_at', engine.store.models.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('qualifying_spend', sa.Float(), server_default=sa.text('0'), nullable=False))
        batch_op.add_column(sa.Column('qualifying_orders', sa.Integer(), server_default=sa.text('0'), nullable=False))
        batch_op.add_column(sa.Column('points_next_expiry_at', engine.store.models.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('points_next_expiry', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('lifecycle_stage', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('rfm_r', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('rfm_f', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('rfm_m', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('rfm_segment', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('aov', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('predicted_clv', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('churn_risk', sa.Boolean(), server_default=sa.text('(false)'), nullable=False))
        batch_op.add_column(sa.Column('churn_reasons', sa.String(length=64), nullable=True))
        batch_op.create_index('ix_members_tier_review', ['tier_review_at'], unique=False)

    # Balances held before the ledger existed become one opening row each, so that balance == sum(ledger) holds.
    op.execute("""
        INSERT INTO points_ledger (member_id, kind, points, occurred_at, expires_at, reason, created_at)
        SELECT id, 'adjust', points, updated_at, NULL, 'opening balance (before the ledger)', updated_at
        FROM members WHERE points <> 0
    """)


def downgrade() -> None:
    with op.batch_alter_table('members', schema=None) as batch_op:
        batch_op.drop_index('ix_members_tier_review')
        batch_op.drop_column('churn_reasons')
        batch_op.drop_column('churn_risk')
        batch_op.drop_column('predicted_clv')
        batch_op.drop_column('aov')
        batch_op.drop_column('rfm_segment')
        batch_op.drop_column('rfm_m')
        batch_op.drop_column('rfm_f')
        batch_op.drop_column('rfm_r')
        batch_op.drop_column('lifecycle_stage')
        batch_op.drop_column('points_next_expiry')
        batch_op.drop_column('points_next_expiry_at')
        batch_op.drop_column('qualifying_orders')
        batch_op.drop_column('qualifying_spend')
        batch_op.drop_column('tier_review_at')
        batch_op.drop_column('tier_since')
        batch_op.drop_column('last_login_at')

    with op.batch_alter_table('points_ledger', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_points_ledger_expires_at'))
        batch_op.drop_index(batch_op.f('ix_points_ledger_member_id_expires_at'))

    op.drop_table('points_ledger')
    op.drop_table('programme_state')
