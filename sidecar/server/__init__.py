"""The HTTP edge: the proxy handler, the admin app, and the one error → HTTP mapping."""
