"""Resilience strategies. Each is a small class with a typed config, an injected clock and the
event sink on the request context; `async __call__(request, ctx, next)`. No aiohttp, pydantic or
YAML here."""
