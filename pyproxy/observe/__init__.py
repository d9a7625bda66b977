"""Observability: proxy health, per-Service health checks and Prometheus metrics (SPEC.md §6)."""
