"""Bearer API keys: the one check that the API, /metrics and the demo's calls all pass through."""

from __future__ import annotations

import hmac

DEMO_PATH = "/ui"  # where `flowmap serve` mounts the Gradio demo

# The doors a key guards when keys are set. Health probes stay open (orchestrators probe without keys);
# the demo's page is open but holds no key: its calls come through /v1 with the visitor's.
GUARDED_PREFIXES = ("/v1/", "/metrics")


def guarded(path: str, content_type: str = "") -> bool:
    """Whether a request needs a key (when keys are set). A file sent to the demo needs one too: the page sends
    none, and Gradio writes what its upload and recording routes receive to the server's disk."""
    sends_files = path.startswith(DEMO_PATH) and content_type.lower().lstrip().startswith("multipart/")
    return path.startswith(GUARDED_PREFIXES) or sends_files


def authorized(authorization: str, keys: list[str]) -> bool:
    """Whether an `Authorization` header carries one of `keys`. Every key is compared, each in
    constant time, so the answer's timing tells nothing about how much of a key matched."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip().encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key.encode())
    return scheme.lower() == "bearer" and bool(token) and matched
