"""Docker HEALTHCHECK: exit 0 when serve answers 200 on /v2/health/ready, else 1.

Python, not curl: the slim and NVIDIA images all have the venv's Python, not all have
curl. The port follows ``TENSORFERRY_PORT`` as serve does (set it, not ``--port``, to
move the server, so this check moves with it).
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("TENSORFERRY_PORT", "8000")
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
