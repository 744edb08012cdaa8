"""The request body limit: a declared Content-Length over `max_body_bytes` is refused before reading,
and a body of unknown length (chunked) is counted as it streams; every body is read whole at the door."""

from __future__ import annotations


def declared_too_large(scope, limit: int) -> bool:
    """Whether the request declares a Content-Length over `limit`."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            return value.isdigit() and int(value) > limit
    return False


def has_a_body(scope) -> bool:
    """A request that may carry a body: one with a method that takes one."""
    return scope["method"] in ("POST", "PUT", "PATCH")


async def read_within(receive, limit: int):
    """Read a body up to `limit` bytes (one of unknown length, chunked, is counted as it streams); None if it is
    larger. The returned receive replays the body once, then hands over to the real one (so disconnects still get
    through)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left mid-upload: pass that on
            pending = [message]
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        if not message.get("more_body", False):
            pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
            break

    async def replay():
        return pending.pop() if pending else await receive()

    return replay
