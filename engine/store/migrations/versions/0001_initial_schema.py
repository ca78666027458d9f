"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 00:34:05.843481
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import engine.store.models


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('audit_head',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('last_seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('last_hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_head'))
    )
    op.create_table('journey_state',
    sa.Column('journey_id', sa.String(length=64), nullable=False),
    sa.Column('current_version', sa.Integer(), nullable=False),
    sa.Column('source_path', sa.String(length=500), nullable=False),
    sa.Column('date_cursor', engine.store.models.UTCDateTime(), nullable=True),
    sa.Column('retired_at', engine.store.models.UTCDateTime(), nullable=True),
    sa.Column('updated_at', engine.store.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('journey_id', name=op.f('pk_journey_state'))
    )
    op.create_table('journey_versions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('journey_id', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('checksum', sa.String(length=64), nullable=False),
    sa.Column('definition', sa.JSON(), nullable=False),
    sa.Column('source_path', sa.String(length=500), nullable=False),
    sa.Column('created_at', engine.store.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_journey_versions')),
    sa.UniqueConstraint('journey_id', 'checksum', name=op.f('uq_journey_versions_journey_id_checksum')),
    sa.UniqueConstraint('journey_id', 'version', name=op.f('uq_journey_versions_journey_id_version'))
    )
    op.create_table('members',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=True),
    sa.Column('email', sa.String(length=320), nullable=True),
    sa.Column('phone', sa.String(length=32), nullable=True),
    sa.Column('birthday', sa.Date(), nullable=True),
    sa.Column('timezone', sa.String(length=64), nullable=True),
    sa.Column('locale', sa.String(length=16), nullable=True),
    sa.Column('signup_at', engine.store.models.UTCDateTime(), nullable=True),
    sa.Column('tier', sa.String(length=32), nullable=True),
    sa.Column('points', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('total_spend', sa.Float(), server_default=sa.text('0'), nullable=False),
    sa.Column('order_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('last_order_at', engine.store.models.UTCDateTime(), nullable=True),
    sa.Column('email_opt_in', sa.Boolean(), server_default=sa.text('(false)'), nullable=False),
    sa.Column('sms_opt_in', sa.Boolean(), server_default=sa.text('(false)'), nullable=False),
    sa.Column('attributes', sa.JSON(), nullable=False),
    sa.Column('created_at', engine.store.models.UTCDateTime(), nullable=False),
    sa.Column('updated_at', engine.store.models.UTCDateTime(), nullable=False),
    sa.Column('forgotten_at', engine.store.models.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_members'))
    )
    with op.batch_alter_table('members', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_members_last_order_at'), ['last_order_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_members_signup_at'), ['signup_at'], unique=False)

    op.create_table('messages',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=False, nullable=False),
    sa.Column('enrollment_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('member_id', sa.String(length=64), nullable=False),
    sa.Column('journey', sa.String(length=64), nullable=False),
    sa.Column('journey_version', sa.Integer(), nullable=False),
    sa.Column('step', sa.String(length=64), nullable=False),
    sa.Column('channel', sa.String(length=16), nullable=False),
    sa.Column('template', sa.String(length=200), nullable=True),
    sa.Column('locale', sa.String(length=16), nullable=True),
    sa.Column('variant', sa.String(length=64), nullable=True),
    sa.Column('recipient', sa.String(length=320), nullable=True),
    sa.Column('subject', sa.Text(), nullable=True),
    sa.Column('body', sa.Text(), nullable=True),
    sa.Column('html', sa.Text(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('provider_id', sa.String(length=128), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', engine.store.models.UTCDateTime(), nullable=True),
    sa.Column('created_at', engine.store.models.UTCDateTime(), nullable=False),
    sa.Column('sent_at', engine.store.models.UTCDateTime(), nullable=True),
    sa.Column('updated_at', engine.store.models.UTCDateTime(), nullable=False),
    sa.Column('claimed_by', sa.String(length=64), nullable=True),
    sa.Column('claimed_until', engine.store.models.UTCDateTime(), nullable=True),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('redacted', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_messages')),
    sa.UniqueConstraint('journey', 'enrollment_id', 'step', name='uq_messages_once')
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_messages_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_messages_journey_created_at'), ['journey', 'created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_messages_member_id_created_at'), ['member_id', 'created_at'], unique=False)
        batch_op.create_index('ix_messages_queued', ['next_attempt_at'], unique=False, sqlite_where=sa.text("status = 'queued'"), postgresql_where=sa.text("status = 'queued'"))
        batch_op.create_index(batch_op.f('ix_messages_status'), ['status'], unique=False)

    op.create_table('suppressions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('channel', sa.String(length=16), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('reason', sa.String(length=64), nullable=False),
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.Column('created_at', engine.store.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_suppressions')),
    sa.UniqueConstraint('channel', 'address', name=op.f('uq_suppressions_channel_address'))
    )
    op.create_table('enrollments',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('journey_id', sa.String(length=64), nullable=False),
    sa.Column('journey_version', sa.Integer(), nullable=False),
    sa.Column('member_id', sa.String(length=64), nullable=False),
    sa.Column('trigger_key', sa.String(length=64), nullable=False),
    sa.Column('event_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('step', sa.String(length=64), nullable=True),
    sa.Column('next_run_at', engine.store.models.UTCDateTime(), nullable=True),
    sa.Column('entered_at', engine.store.models.UTCDateTime(), nullable=False),
    sa.Column('ended_at', engine.store.models.UTCDateTime(), nullable=True),
    sa.Column('exit_reason', sa.String(length=200), nullable=True),
    sa.Column('converted_at', engine.store.models.UTCDateTime(), nullable=True),
    sa.Column('variant', sa.String(length=64), nullable=True),
    sa.Column('claimed_by', sa.String(length=64), nullable=True),
    sa.Column('claimed_until', engine.store.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['member_id'], ['members.id'], name=op.f('fk_enrollments_member_id_members'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_enrollments')),
    sa.UniqueConstraint('journey_id', 'member_id', 'trigger_key', name=op.f('uq_enrollments_journey_id_member_id_trigger_key'))
    )
    with op.batch_alter_table('enrollments', schema=None) as batch_op:
        batch_op.create_index('ix_enrollments_due', ['next_run_at'], unique=False, sqlite_where=sa.text("status = 'active'"), postgresql_where=sa.text("status = 'active'"))
        batch_op.create_index(batch_op.f('ix_enrollments_member_id'), ['member_id'], unique=False)
        batch_op.create_index('uq_enrollments_one_active', ['journey_id', 'member_id'], unique=True, sqlite_where=sa.text("status = 'active'"), postgresql_where=sa.text("status = 'active'"))

    op.create_table('events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('external_id', sa.String(length=128), nullable=True),
    sa.Column('member_id', sa.String(length=64), nullable=False),
    sa.Column('type', sa.String(length=64), nullable=False),
    sa.Column('occurred_at', engine.store.models.UTCDateTime(), nullable=False),
    sa.Column('properties', sa.JSON(), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.Column('recorded_at', engine.store.models.UTCDateTime(), nullable=False),
    sa.Column('handled_at', engine.store.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['member_id'], ['members.id'], name=op.f('fk_events_member_id_members'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_events')),
    sa.UniqueConstraint('external_id', name=op.f('uq_events_external_id'))
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_events_member_id_occurred_at'), ['member_id', 'occurred_at'], unique=False)
        batch_op.create_index('ix_events_unhandled', ['occurred_at'], unique=False, sqlite_where=sa.text('handled_at IS NULL'), postgresql_where=sa.text('handled_at IS NULL'))




def downgrade() -> None:

    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_unhandled', sqlite_where=sa.text('handled_at IS NULL'), postgresql_where=sa.text('handled_at IS NULL'))
        batch_op.drop_index(batch_op.f('ix_events_member_id_occurred_at'))

    op.drop_table('events')
    with op.batch_alter_table('enrollments', schema=None) as batch_op:
        batch_op.drop_index('uq_enrollments_one_active', sqlite_where=sa.text("status = 'active'"), postgresql_where=sa.text("status = 'active'"))
        batch_op.drop_index(batch_op.f('ix_enrollments_member_id'))
        batch_op.drop_index('ix_enrollments_due', sqlite_where=sa.text("status = 'active'"), postgresql_where=sa.text("status = 'active'"))

    op.drop_table('enrollments')
    op.drop_table('suppressions')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_messages_status'))
        batch_op.drop_index('ix_messages_queued', sqlite_where=sa.text("status = 'queued'"), postgresql_where=sa.text("status = 'queued'"))
        batch_op.drop_index(batch_op.f('ix_messages_member_id_created_at'))
        batch_op.drop_index(batch_op.f('ix_messages_journey_created_at'))
        batch_op.drop_index(batch_op.f('ix_messages_created_at'))

    op.drop_table('messages')
    with op.batch_alter_table('members', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_members_signup_at'))
        batch_op.drop_index(batch_op.f('ix_members_last_order_at'))

    op.drop_table('members')
    op.drop_table('journey_versions')
    op.drop_table('journey_state')
    op.drop_table('audit_head')

