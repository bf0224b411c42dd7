"""Reading a request body with a hard limit, for the HTTP routes mmcore serves (the index back
end, the OpenAI-compatible API): a declared Content-Length over the limit is refused before
reading, and a chunked body is read only up to the limit, never whole into memory."""

from .errors import InputError


class TooLarge(InputError):
    """The body is over the limit (HTTP 413)."""


async def read_limited(request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"The request body is over {limit:,} bytes.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"The request body is over {limit:,} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)
