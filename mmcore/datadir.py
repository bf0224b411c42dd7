"""The data dir: what a server makes that must outlive a restart.

    <data dir>/models/<name>/      fine-tuned models (what `finetune` writes)
    <data dir>/runs/<name>/run.json  one record per training run: options, state
    <data dir>/runs/<name>/data/     the run's training data, kept while it may resume

Default: `$MMCORE_DATA_DIR`, else `/data/mmcore` on a Hugging Face Space with persistent
storage (`/data` exists and is writable), else `$MMCORE_CACHE/data`. At start the app removes
half-written `.tmp-*` / `.old-*` folders (left by a write that was killed), lists finished
models, and offers to resume runs that were still running when the server stopped.
"""

import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import cache
from .errors import InputError

STATES = ("running", "finished", "stopped", "failed")
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,59}")   # a folder name, nothing more


RESTART_NOTICE = ("**This Space has no persistent storage**: fine-tuned models and saved "
                  "indexes are lost when it restarts. Download what you want to keep.")


def lost_on_restart(root, persistent="/data") -> bool:
    """True on a Hugging Face Space whose data dir is not on its persistent storage (mounted
    at `persistent`): a restart wipes it."""
    if not os.environ.get("SPACE_ID"):
        return False
    storage = Path(persistent)
    if not (storage.is_dir() and os.access(storage, os.W_OK)):
        return True
    return not Path(root).resolve().is_relative_to(storage.resolve())


def default_data_dir() -> Path:
    if os.environ.get("MMCORE_DATA_DIR"):
        return Path(os.environ["MMCORE_DATA_DIR"])
    if os.environ.get("SPACE_ID") and os.path.isdir("/data") and os.access("/data", os.W_OK):
        return Path("/data/mmcore")
    return cache.cache_root() / "data"


@dataclass
class Run:
    name: str
    options: dict                       # finetune keyword arguments
    state: str = "running"              # one of STATES
    started: float = field(default_factory=time.time)
    message: str = ""                   # why it failed, shown to users
    owner: str = ""                     # a digest of the session that ran it last
    boot: str = ""                      # the server process (`DataDir.boot`) that ran it
    key: str = ""                       # a digest of its resume key (shown to its owner)


class DataDir:
    def __init__(self, root=None):
        self.root = Path(root) if root else default_data_dir()
        self.models = self.root / "models"
        self.runs = self.root / "runs"
        self.boot = uuid.uuid4().hex        # this server process: runs of others are orphans

    @property
    def lost_on_restart(self) -> bool:
        return lost_on_restart(self.root)

    def prepare(self) -> list:
        """Make the folders and remove stale temp folders; returns what was removed."""
        self.models.mkdir(parents=True, exist_ok=True)
        self.runs.mkdir(parents=True, exist_ok=True)
        removed = []
        for folder in (self.models, self.runs):
            for stale in folder.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale.name)
            for stale in folder.glob(".old-*"):
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale.name)
        return removed

    # ---------------------------------------------------------------- runs
    def new_run(self, options: dict, name: str = "") -> Run:
        """A new run record; `name` is the user's (letters, digits, . _ -; up to 60) or, when
        blank, a timestamp. A taken name gets -2, -3... ."""
        base = (name or "").strip() or f"finetuned-{time.strftime('%Y%m%d-%H%M%S')}"
        if not RUN_NAME.fullmatch(base):
            raise InputError("A run name uses letters, digits, '.', '_' and '-' (up to 60, "
                             f"not starting with '.'), not {base[:60]!r}.")
        name, n = base, 2
        while (self.runs / name).exists() or (self.models / name).exists():
            name, n = f"{base}-{n}", n + 1
        run = Run(name, dict(options))
        (self.runs / name).mkdir(parents=True)
        self.save(run)
        return run

    def save(self, run: Run) -> None:
        """The record, written whole or not at all."""
        folder = self.runs / run.name
        fd, tmp = tempfile.mkstemp(prefix=".tmp-run-", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(run), f)
        os.replace(tmp, folder / "run.json")

    def load(self, name: str) -> Run:
        if not isinstance(name, str) or name not in {r.name for r in self.all_runs()}:
            raise InputError(f"No training run named {str(name)[:80]!r} on this server.")
        return self._read(self.runs / name / "run.json")

    def _read(self, path: Path) -> Run:
        raw = json.loads(path.read_text())
        return Run(**{k: raw[k] for k in Run.__dataclass_fields__ if k in raw})

    def all_runs(self) -> list:
        out = []
        for record in sorted(self.runs.glob("*/run.json")):
            try:
                out.append(self._read(record))
            except (OSError, ValueError, TypeError):
                continue                                     # a damaged record: ignored
        return out

    def data(self, run: Run) -> Path:
        return self.runs / run.name / "data"

    def model(self, run: Run) -> Path:
        return self.models / run.name

    def finish(self, run: Run, state: str, message: str = "") -> None:
        """Record how a run ended; a run that can no longer resume drops its data copy."""
        run.state, run.message = state, message
        self.save(run)
        if state in ("finished", "failed"):
            shutil.rmtree(self.data(run), ignore_errors=True)

    # ---------------------------------------------------------------- what users see
    def finished_models(self) -> dict:
        """{name: folder} of complete models whose run finished or was stopped by its user
        (or that have no run record: put there by the operator)."""
        states = {r.name: r.state for r in self.all_runs()}
        out = {}
        for folder in sorted(self.models.iterdir()) if self.models.is_dir() else []:
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            if cache.is_complete(folder) and states.get(folder.name, "finished") in \
                    ("finished", "stopped"):
                out[folder.name] = str(folder)
        return out

    def claim(self, run: Run, owner: str | None) -> str:
        """`owner` (a digest of a session) runs `run` now, in this server process; returns
        a new resume key for it (only its digest is kept): with it, another page (a reload
        makes a new session) may resume the run."""
        key = secrets.token_urlsafe(9)
        run.owner, run.boot, run.key = owner or "", self.boot, digest(key)
        self.save(run)
        return key

    def may_resume(self, run: Run, owner: str | None, key: str | None = None) -> bool:
        """Only the session that ran it, or whoever holds its resume key, may resume a run
        while this server process lives (anyone else would take the job over: its owner
        could no longer stop it, and the run would overwrite the owner's model). A run of
        an earlier process, or one nobody claimed, is anyone's: its session is gone."""
        if run.boot != self.boot or not run.owner:
            return True
        if owner is not None and hmac.compare_digest(run.owner.encode(), owner.encode()):
            return True
        return bool(key) and bool(run.key) and hmac.compare_digest(
            run.key.encode(), digest(str(key)).encode())

    def free_cut_short(self, needed: int) -> list:
        """Drop the data of runs cut short, oldest first, until `needed` bytes are freed
        (their models stay; they can no longer resume). The data dir's scratch: a stopped
        run keeps up to a GB of training data. Returns their names."""
        from .archives import size_of

        freed, names = 0, []
        for run in sorted(self.cut_short(), key=lambda r: r.started):
            if freed >= needed:
                break
            freed += size_of(self.data(run))
            shutil.rmtree(self.data(run), ignore_errors=True)
            names.append(run.name)
        return names

    def cut_short(self) -> list:
        """Runs that stopped before they finished (the server went down, or their user
        stopped them) and still have their data."""
        return [r for r in self.all_runs() if r.state in ("running", "stopped")
                and self.data(r).is_dir()]

    def resumable(self, owner: str | None = None) -> list:
        """Names of the runs cut short that `owner` may resume."""
        return [r.name for r in self.cut_short() if self.may_resume(r, owner)]


def digest(text: str) -> str:
    """A short sha256 digest of `text`: what is kept of a session or a key, never either."""
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:32]
