"""Models loaded into a role at run time, beside a server's kit (the Models tab, `/models`).

The operator decides what may load: `allowed` lists hub ids or folders per role (`--models
FILE`, JSON `{"causal_lm": ["distilgpt2", ...], ...}`), and `open_loading` (`--allow-model-
loading`) lets users name any hub id (never a server folder unless listed). Each model loads
in a background thread through the kit's honest checks (`load_kit(..., role=source)`); past
`budget_mb` of extra weights the least recently used extra model is released.

    pool = ModelPool(kit, allowed={"causal_lm": ["distilgpt2"]}, budget_mb=2000)
    pool.request("causal_lm", "distilgpt2")      # starts loading; returns the choice name
    pool.status("causal_lm", "distilgpt2")       # "loading" | "ready" | "error: ..."
    pool.kit("causal_lm", "distilgpt2")          # a Kit whose causal_lm is that model
"""

import json
import threading
from collections import OrderedDict
from pathlib import Path

from .errors import InputError, ModelUnavailable
from .kits import ROLES, load_kit, loaded_bytes, release

MB = 1024 * 1024
MAX_SOURCE = 300
MAX_LOADING = 2               # loads in flight at once; more are told to try again
MAX_ERRORS = 64               # failed loads remembered (their status), oldest forgotten
# what a hub model needs (never every format in its repository)
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def read_allowed(path) -> dict:
    """{role: [source, ...]} from an operator's JSON file, checked."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"--models {path}: not a readable JSON file ({exc}).") from None
    if not isinstance(data, dict):
        raise InputError(f"--models {path}: expected an object of role -> list of models.")
    allowed = {}
    for role, sources in data.items():
        if role not in ROLES:
            raise InputError(f"--models {path}: unknown role {role!r}; roles are "
                             f"{', '.join(ROLES)}.")
        if not isinstance(sources, list) or not all(isinstance(s, str) and s.strip()
                                                    for s in sources):
            raise InputError(f"--models {path}: {role} must list model ids or folders.")
        allowed[role] = [s.strip() for s in sources]
    return allowed


def _check_source(source) -> str:
    if not isinstance(source, str) or not source.strip():
        raise InputError("Name a model: a hub id such as distilgpt2.")
    source = source.strip()
    if len(source) > MAX_SOURCE or any(c in source for c in "\n\r\x00"):
        raise InputError("That is not a model name.")
    return source


def _hub_id(source: str) -> bool:
    """A hub id: "name" or "owner/name", no path tricks (users may not name server folders)."""
    parts = source.split("/")
    return (len(parts) <= 2 and all(p and p not in (".", "..") for p in parts)
            and not source.startswith(("~", "/")) and "\\" not in source)


def fetch(source: str) -> str:
    """A user's hub id as a folder in the Hugging Face cache (downloaded when the hub is
    reachable): a name is never looked up as a folder on this server, however it reads."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, allow_patterns=HUB_FILES)
    except Exception as exc:  # noqa: BLE001 - no network, no such repo, gated, ...
        raise ModelUnavailable(f"'{source}' could not be fetched from the Hugging Face hub "
                               f"({type(exc).__name__}).") from None


def _scrub(message: str, source: str, path: str) -> str:
    """A load's message fit for any user: no folder of this server in it."""
    import re

    from .dual_encoder import public_name

    for raw, shown in ((path, source), (source, public_name(source))):
        if raw != shown:
            message = message.replace(raw, shown)
    return re.sub(r"(?<![\w.])/[^\s'\"]+", "<path>", message)[:500]


class ModelPool:
    def __init__(self, kit, allowed: dict | None = None, open_loading: bool = False,
                 budget_mb: float = 4096):
        self.base = kit
        self.allowed = {role: list(v) for role, v in (allowed or {}).items()}
        self.open_loading = open_loading
        self.budget_mb = budget_mb
        self._lock = threading.Lock()
        self._kits: OrderedDict = OrderedDict()     # (role, source) -> Kit, least recent first
        self._errors: OrderedDict = OrderedDict()   # (role, source) -> message
        self._loading: set = set()

    # ---- policy
    def may_load(self, role: str, source: str) -> None:
        if role not in ROLES:
            raise InputError(f"Unknown role {role!r}; roles are {', '.join(ROLES)}.")
        source = _check_source(source)
        if source in self.allowed.get(role, []):
            return
        if self.open_loading and _hub_id(source):
            return
        if self.open_loading:
            raise InputError("Only hub ids (such as gpt2 or owner/name) may be loaded here; "
                             "server folders must be listed by the operator (--models).")
        raise InputError("Loading models is off on this server; the operator can list models "
                         "with --models FILE or allow any hub id with --allow-model-loading.")

    def choices(self, role: str) -> list:
        """Models a user may pick for `role`: loaded or listed ones, loaded first."""
        with self._lock:
            loaded = [s for (r, s) in self._kits if r == role]
        return loaded + [s for s in self.allowed.get(role, []) if s not in loaded]

    # ---- loading
    def request(self, role: str, source: str, wait: bool = False) -> str:
        """Start loading `source` into `role` (a no-op when it is loaded or loading)."""
        self.may_load(role, source)
        source = _check_source(source)
        key = (role, source)
        with self._lock:
            if key in self._kits or key in self._loading:
                return source
            if len(self._loading) >= MAX_LOADING:
                raise InputError(f"{len(self._loading)} models are loading now; try again in "
                                 "a minute.")
            self._loading.add(key)
            self._errors.pop(key, None)
        thread = threading.Thread(target=self._load, args=(key,), daemon=True,
                                  name=f"mmcore-load-{role}")
        thread.start()
        if wait:
            thread.join()
        return source

    def _load(self, key) -> None:
        role, source = key
        path = source
        try:
            if source not in self.allowed.get(role, []):
                path = fetch(source)           # a user's hub id: only ever from the hub
            kit = load_kit(self.base.name, precision=self.base.precision, **{role: path})
            kit.model(role)
        except Exception as exc:  # noqa: BLE001 - a failed load is reported, never raised
            known = isinstance(exc, (InputError, ModelUnavailable))
            message = str(exc) if known else f"{type(exc).__name__}: could not load it."
            with self._lock:
                self._errors[key] = _scrub(message, source, path)
                while len(self._errors) > MAX_ERRORS:
                    self._errors.popitem(last=False)
                self._loading.discard(key)
            return
        with self._lock:
            self._kits[key] = kit
            self._loading.discard(key)
        self._evict()

    def status(self, role: str, source: str) -> str:
        key = (role, str(source).strip())
        with self._lock:
            if key in self._kits:
                return "ready"
            if key in self._loading:
                return "loading"
            if key in self._errors:
                return f"error: {self._errors[key]}"
        return "not loaded"

    def kit(self, role: str, source: str):
        """The kit serving `source` in `role` (loaded first with `request`)."""
        key = (role, str(source).strip())
        with self._lock:
            if key not in self._kits:
                state = self.status_locked(key)
                raise InputError(f"{source!r} is {state} for {role}; load it on the Models tab.")
            self._kits.move_to_end(key)
            return self._kits[key]

    def status_locked(self, key) -> str:
        if key in self._loading:
            return "still loading"
        return "not loaded" if key not in self._errors else "not loadable"

    # ---- memory
    def extra_mb(self) -> dict:
        with self._lock:
            items = list(self._kits.items())
        return {f"{role}: {source}": round(loaded_bytes(kit, self.base) / MB, 1)
                for (role, source), kit in items}

    def _evict(self) -> None:
        """Release least recently used extra models until the rest fit the budget (the most
        recent one always stays)."""
        while True:
            with self._lock:
                items = list(self._kits.items())
            if len(items) <= 1:
                return
            total = sum(loaded_bytes(kit, self.base) for _, kit in items) / MB
            if total <= self.budget_mb:
                return
            key, old = items[0]
            with self._lock:
                self._kits.pop(key, None)
            release(old, keep=self.base)
