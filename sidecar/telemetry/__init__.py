"""Telemetry: events from strategies turned into logs, spans and metrics."""
