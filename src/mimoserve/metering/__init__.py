"""Measuring what the server does: Prometheus metrics (usage records come later)."""
