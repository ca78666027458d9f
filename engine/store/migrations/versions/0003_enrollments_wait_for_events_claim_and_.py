"""enrollments wait for events; claim and at-most-once indexes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 01:34:27.164807
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import engine.store.models


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:

    with op.batch_alter_table('enrollments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('waiting_for', sa.String(length=64), nullable=True))
        batch_op.drop_index(batch_op.f('ix_enrollments_due'), sqlite_where=sa.text("status = 'active'"))
        batch_op.create_index('ix_enrollments_due', ['next_run_at', 'id'], unique=False, sqlite_where=sa.text("status = 'active'"), postgresql_where=sa.text("status = 'active'"))

    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_messages_enrollment_id'), ['enrollment_id'], unique=False)

    with op.batch_alter_table('members', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_members_phone'), ['phone'], unique=False)
        batch_op.create_index(batch_op.f('ix_members_email'), ['email'], unique=False)




def downgrade() -> None:

    with op.batch_alter_table('members', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_members_email'))
        batch_op.drop_index(batch_op.f('ix_members_phone'))

    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_messages_enrollment_id'))

    with op.batch_alter_table('enrollments', schema=None) as batch_op:
        batch_op.drop_index('ix_enrollments_due', sqlite_where=sa.text("status = 'active'"), postgresql_where=sa.text("status = 'active'"))
        batch_op.create_index(batch_op.f('ix_enrollments_due'), ['next_run_at'], unique=False, sqlite_where=sa.text("status = 'active'"), postgresql_where=sa.text("status = 'active'"))
        batch_op.drop_column('waiting_for')


