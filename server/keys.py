"""Bearer API keys: the one check that the API, /metrics and the demo's calls all pass through."""

from __future__ import annotations

import hmac

# The doors a key guards when keys are set. Health probes stay open (orchestrators probe without keys);
# the demo's page is open but holds no key: its calls come through /v1 with the visitor's.
GUARDED_PREFIXES = ("/v1/", "/metrics")
# Gradio's file upload under the mounted demo, which no part of the page uses: it would let anyone write files to
# the server's disk
GUARDED_SUFFIXES = ("/gradio_api/upload",)


def guarded(path: str) -> bool:
    return path.startswith(GUARDED_PREFIXES) or path.rstrip("/").endswith(GUARDED_SUFFIXES)


def authorized(authorization: str, keys: list[str]) -> bool:
    """Whether an `Authorization` header carries one of `keys`. Every key is compared, each in
    constant time, so the answer's timing tells nothing about how much of a key matched."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip().encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key.encode())
    return scheme.lower() == "bearer" and bool(token) and matched
