"""Policies: YAML files parsed once at the edge into frozen, typed models."""
