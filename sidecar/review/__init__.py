"""The human review queue: the store protocol with its SQLite and PostgreSQL backends, the review
desk the confidence gate hands uncertain answers to, capability status URLs, the reviewer API,
webhooks from a durable outbox, and the reviewers' web page."""
