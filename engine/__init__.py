"""Rule-driven marketing automation engine for membership programmes."""

__version__ = "0.1.0"
