"""The request body limit: a declared Content-Length over `max_body_bytes` is refused before reading,
and a body of unknown length (chunked) is counted as it streams."""

from __future__ import annotations


def declared_too_large(scope, limit: int) -> bool:
    """Whether the request declares a Content-Length over `limit`."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            return value.isdigit() and int(value) > limit
    return False


def streams_a_body(scope) -> bool:
    """A request with a body but no Content-Length (chunked transfer): its size is known only once read."""
    names = {name.lower() for name, _ in scope.get("headers", [])}
    return scope["method"] in ("POST", "PUT", "PATCH") and b"content-length" not in names


async def read_within(receive, limit: int):
    """Read a body of unknown length up to `limit` bytes; None if it is larger. The returned receive
    replays the body once, then hands over to the real one (so disconnects still get through)."""
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
