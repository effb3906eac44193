"""The human review queue: the store protocol and its SQLite backend, the review desk the
confidence gate hands uncertain answers to, capability status URLs, and the reviewer API."""
