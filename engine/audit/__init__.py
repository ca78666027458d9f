"""The message log as an auditor sees it: the hash chain and its verification, queries and exports.

May import: engine.store.
"""
