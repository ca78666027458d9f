"""One tick of the scheduler, phase by phase: the programme's scheduled work, entry and exit, running due
steps (composer, compose worker, safety rails, hand-over to channels), reconciliation (failed units are set
aside through engine.store.quarantine) and the tick's report and health.

May import: everything below it (domain, rules, matching, store, audit, programme) and the channel interface.
"""
