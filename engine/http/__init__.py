"""The HTTP service: event and member API, provider webhooks (signed), unsubscribe pages, health and metrics.

May import: engine.app and everything below it.
"""
