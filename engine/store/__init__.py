"""The database: engine creation and migrations (Alembic, under migrations/), the schema, the statements that
matter under concurrency, hand-overs and messages in doubt, enrollments, the safety rails' lists, the quarantine
of failed units of work, batch loading and the computed attributes in SQL.

May import: engine.domain, engine.exceptions (and the standard library, SQLAlchemy, Alembic). Nothing above
it: the rules, the phases and the programme call into the store, never the other way round.
"""
