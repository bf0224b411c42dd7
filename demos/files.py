"""Files on a public server: which uploads a handler may open, and where each request and
each user session keeps the files it makes.

Uploads: Gradio stores every upload as `<GRADIO_TEMP_DIR>/<sha256>/<name>`, the hash seeded
with a secret of this server, so a path of that shape is a capability only its uploader holds.
`uploaded()` accepts exactly that: a regular file (no symlink, no folder) directly inside one
such folder. Every file input of every tab goes through it, with `preprocess=False` so the
raw client value is checked here, never trusted.

Our own files live under `<GRADIO_TEMP_DIR>/mmcore/` (inside Gradio's cache, so a file handed
back is served in place, never copied): `s-<digest of the session>/requests/<id>/` for one
request (removed when it ends), `downloads/<id>/` and `thumbs/` for what the user must be able
to fetch (removed when the session ends, or after it has been idle a while). A disk quota per
session and one for the whole server bound them; extracted zip bytes count against it.
"""

import asyncio
import os
import re
import shutil
import stat
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mmcore import InputError
from mmcore.archives import size_of
from mmcore.datadir import digest

UPLOAD_FOLDER = re.compile(r"^[0-9a-f]{64}$")
MAX_NAME = 200


def upload_root() -> Path:
    from gradio.utils import get_upload_folder

    return Path(os.path.realpath(get_upload_folder()))


@dataclass
class Upload:
    path: Path          # the checked file on this server (never shown to anyone)
    name: str           # the name the user gave it (untrusted text: shown as text only)


def _display_name(name, path: Path) -> str:
    name = name if isinstance(name, str) and name.strip() else path.name
    name = re.sub(r"[\x00-\x1f\x7f]", "", name.replace("\\", "/").rsplit("/", 1)[-1])
    return name[:MAX_NAME] or "file"


def uploaded(value, what: str = "file") -> Upload | None:
    """The upload a client names (a FileData dict or a path), checked; None for no file."""
    if value is None or value == "":
        return None
    refusal = InputError(f"The {what} must be a file uploaded with this request; "
                         "upload it again.")
    if isinstance(value, dict):
        path, name = value.get("path"), value.get("orig_name")
    elif isinstance(value, str):
        path, name = value, None
    else:
        raise refusal
    if not isinstance(path, str) or not path or "\x00" in path or len(path) > 4096:
        raise refusal
    real = Path(os.path.realpath(path))
    try:
        rel = real.relative_to(upload_root())
        mode = os.lstat(path).st_mode
    except (ValueError, OSError):
        raise refusal from None
    if len(rel.parts) != 2 or not UPLOAD_FOLDER.match(rel.parts[0]) or not stat.S_ISREG(mode):
        raise refusal
    return Upload(real, _display_name(name, real))


def uploaded_list(values, what: str, limit: int) -> list:
    """Several uploads (at most `limit` per request), each checked."""
    if values is None:
        return []
    if not isinstance(values, list):
        values = [values]
    if len(values) > limit:
        raise InputError(f"{len(values)} files; at most {limit} per request.")
    return [uploaded(v, what) for v in values if v not in (None, "")]


class SessionFiles:
    """Per-request and per-session folders with a disk quota (see the module doc)."""

    EMPTY_AFTER = 600.0         # seconds before an emptied upload folder is removed

    def __init__(self, root: Path, session_bytes: int, total_bytes: int,
                 idle_seconds: float = 6 * 3600):
        self.root = Path(root)
        self.session_bytes, self.total_bytes = session_bytes, total_bytes
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._swept = 0.0

    def session(self, request) -> Path:
        """This user session's folder (made on first use; its stamp marks it alive)."""
        key = getattr(request, "session_hash", None) or "anonymous"
        folder = self.root / f"s-{digest(str(key))}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".alive").touch()
        return folder

    @contextmanager
    def request(self, request):
        """A fresh folder for one request, removed when the request ends (also when it
        fails or is cancelled: a generator's `finally` runs when Gradio closes it)."""
        self.sweep()
        folder = self.session(request) / "requests" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def download(self, request, name: str) -> Path:
        """A path for a file the user downloads; it stays until the session ends."""
        if self.budget(request) <= 0:
            raise InputError("Your session has used its disk space; close the page and "
                             "open it again to start afresh.")
        folder = self.session(request) / "downloads" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder / name

    def thumbs(self, request) -> Path:
        folder = self.session(request) / "thumbs"
        folder.mkdir(exist_ok=True)
        return folder

    def budget(self, request) -> int:
        """Bytes this session may still write: its own quota, and the server's, which all of
        Gradio's folder counts against (uploads, outputs, every session's files)."""
        mine = size_of(self.session(request))
        return min(self.session_bytes - mine, self.total_bytes - size_of(self.root.parent))

    def end(self, request) -> None:
        """The session ended: everything it made goes."""
        if getattr(request, "session_hash", None):
            shutil.rmtree(self.session(request), ignore_errors=True)

    def sweep(self, force: bool = False) -> None:
        """Remove sessions idle longer than `idle_seconds` (a browser that vanished without
        closing its connection); at most once a minute."""
        now = time.time()
        with self._lock:
            if not force and now - self._swept < 60:
                return
            self._swept = now
        uploads = self.root.parent
        for folder in uploads.iterdir() if uploads.is_dir() else ():
            # Gradio's cache cleanup deletes old uploads but leaves their (hash) folders
            try:
                if UPLOAD_FOLDER.match(folder.name) and \
                        now - folder.stat().st_mtime > self.EMPTY_AFTER:
                    folder.rmdir()                     # only when empty
            except OSError:
                pass
        if not self.root.is_dir():
            return
        for folder in self.root.glob("s-*"):
            try:
                idle = now - (folder / ".alive").stat().st_mtime
            except OSError:
                idle = self.idle_seconds + 1
            if idle > self.idle_seconds:
                shutil.rmtree(folder, ignore_errors=True)


class UploadLimit:
    """ASGI middleware: one upload request may carry at most `max_bytes` (Gradio alone takes
    up to 1000 files of `max_file_size` each per request), and all uploads together, with
    everything else in Gradio's folder (`root`: our session files, outputs), at most
    `total_bytes()` (507 past it: each request under its own cap, one client wrote 1.5 GB
    in 14 s). The size must be declared (Content-Length; a chunked upload of unknown size
    is refused), so nothing is written before the checks.

    The folder is measured (in a worker thread, never on the event loop) at most every
    RECOUNT seconds; every request accepted since a measurement began, finished or still
    streaming in, counts at its declared size on top of it (a slow upload's bytes are not
    on disk yet when the folder is measured; counting them twice is the safe side)."""

    RECOUNT = 2.0

    def __init__(self, app, max_bytes: int, total_bytes=None, root=None):
        self.app, self.max_bytes = app, max_bytes
        self.total_bytes, self.root = total_bytes, root
        self._measuring = asyncio.Lock()
        self._measured_at, self._measured = -1e9, 0
        self._after = 0                 # declared bytes accepted since the measurement began
        self._in_flight = 0             # declared bytes of accepted requests not finished

    def _size(self) -> int:
        root = Path(self.root() if callable(self.root) else self.root)
        return size_of(root) if root.is_dir() else 0

    async def _take(self, declared: int) -> bool:
        """Take `declared` bytes of the folder's quota if they fit."""
        if self.total_bytes is None:
            self._in_flight += declared
            return True
        import anyio

        async with self._measuring:
            if time.monotonic() - self._measured_at > self.RECOUNT:
                streaming = self._in_flight
                measured = await anyio.to_thread.run_sync(self._size)
                self._measured_at, self._measured = time.monotonic(), measured
                self._after = streaming
            if self._measured + self._after + declared > int(self.total_bytes()):
                return False
            self._after += declared
            self._in_flight += declared
            return True

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or \
                not scope.get("path", "").rstrip("/").endswith("/upload"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if not declared.isdigit():
            return await _refuse(send, 411, b"Uploads must declare their size.")
        size = int(declared)
        if size > self.max_bytes:
            return await _refuse(send, 413, f"An upload request may carry at most "
                                            f"{self.max_bytes // 2**20} MB.".encode())
        if not await self._take(size):
            return await _refuse(send, 507, b"The server's upload space is full; try again "
                                            b"in a while.")
        try:
            return await self.app(scope, receive, send)
        finally:
            self._in_flight -= size


async def _refuse(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
