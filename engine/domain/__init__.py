"""The product's values and rules that need no database and no files: member attributes and their types,
time, unsubscribe tokens.

May import: the standard library, engine.exceptions. Nothing else of the engine.
"""
