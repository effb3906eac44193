"""Container HEALTHCHECK: exit 0 when the sidecar's admin listener answers GET /healthz with 200.

The image has no curl; this uses only the standard library. It asks loopback on the admin port
from SIDECAR_ADMIN_PORT (default 8701), which works because the container binds the admin
listener to 0.0.0.0.
"""

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("SIDECAR_ADMIN_PORT") or "8701"
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
