"""Members and events in: member files (CSV/JSONL) validated and upserted, and events recorded one at a time
or from a file with the built-in types' effects on the member.

May import: engine.domain, engine.rules, engine.store, engine.programme.
"""
