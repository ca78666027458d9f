"""One tick of the scheduler, phase by phase: the programme's scheduled work, entry and exit, running due
steps (composer, compose worker, safety rails, hand-over to channels), reconciliation, fault isolation
(quarantine, retry) and the tick's report and health.

May import: everything below it (domain, rules, matching, store, audit, programme, ingest) and the channel
interface.
"""
