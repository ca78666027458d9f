"""Marketer-owned files in, as checked models: strict YAML with positions, problems as FILE:LINE:COL, the
condition language, journeys, the loyalty programme's definition, the rulebook, templates (and the sandbox they
render in), journey and template versions, and `run.py validate`.

May import: engine.domain, engine.store (conditions compile to SQL over its tables; versions are stored rows).
"""
