"""Which event rules (triggers, exits, goals) an event matches: durable-rules behind an interface of our own,
checked against the Python evaluator by the differential test.

May import: engine.domain, engine.rules.
"""
