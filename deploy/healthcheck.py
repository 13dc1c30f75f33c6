"""Container health check: exit 0 when GET /healthz answers 200, else 1 (the JSON body, which
names the part that is down, goes to stdout for `docker inspect`).

The image's HEALTHCHECK runs it; with BRIDGE_HTTP__LISTEN unset there is nothing to ask, and a
running container counts as healthy. Only the standard library: the slim image has no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT = 8.0  # seconds; below the HEALTHCHECK --timeout
# A wildcard listening address is reached on loopback.
LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}  # noqa: S104


def main() -> int:
    """Ask /healthz on the address the bridge listens on."""
    listen = os.environ.get("BRIDGE_HTTP__LISTEN", "")
    if not listen:
        return 0
    host, _, port = listen.rpartition(":")
    url = f"http://{LOOPBACK.get(host, host)}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as exc:  # 503: the body says which part is down
        sys.stdout.write(exc.read().decode("utf-8", "replace") + "\n")
    except OSError as exc:  # refused, timed out: not listening (yet)
        sys.stdout.write(f"{url}: {exc}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
