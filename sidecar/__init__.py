"""A resilience sidecar for AI model servers.

The sidecar sits beside a model server, proxies every request to it and decides what happens when
the model is slow, down, returns garbage or answers with low confidence.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
