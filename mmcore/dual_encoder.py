"""Image-text dual encoders behind one interface.

    encoder.encode_images(images) -> (N, D), encoder.encode_texts(texts) -> (N, D)

both L2-normalised, plus `logit_scale` (similarities are multiplied by it before a softmax),
`logit_bias` (added after it, for models trained with a sigmoid loss such as SigLIP; None
for the others) and `identity` (names the exact model: caches and saved indexes key on it).
Three kinds:

1. `ClipEncoder`: a Hugging Face CLIPModel (or any model with get_image_features /
   get_text_features) with its processor.
2. `TowerDualEncoder`: the classic from-scratch CLIP design: a pretrained image backbone and
   a pretrained text encoder, each followed by a linear projection into a shared space,
   L2 normalisation and a learnable temperature. Configured by `TowerConfig`; saved as
   safetensors plus JSON.
3. `conse_encoder(...)`: ConSE (Norouzi et al., 2014) as a tower: the image "backbone" is an
   ImageNet classifier whose top-T class probabilities are kept, and the image projection is
   initialised to the text embeddings of the class prompts, so at step 0 an image's embedding
   is the probability-weighted mean of its top classes' text embeddings; the text projection
   starts as the identity. Fine-tuning starts from exactly ConSE.

The training surface (all `mmcore.train` knows of a model): `trainable_copy(part, name)`,
`trainable_parameters(part)`, `image_inputs(pil)` (what a data-loader worker makes of one
image), `tower_features(pixels, texts)`, `project(image_features, text_features)`,
`log_logit_scale` (the learnable temperature), `weights` (the nn.Module holding them all),
and `save(folder, part)` / `load(folder)`; `load_encoder(folder, base)` builds an encoder
from any saved folder.
"""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .errors import InputError
from .images import load_image
from .lru import BytesLRU

BATCH = 32                  # texts per forward = 4 x this; images: each encoder's image_batch
TEXT_CACHE_BYTES = 64 * 2**20      # per encoder
DECODE_WINDOW = 32          # images decoded together, on every core, before their forwards
_TO_TENSOR = ("ToTensor", "MaybeToTensor", "PILToTensor", "MaybePILToTensor", "ToImage")


def decode_all(decode, sources) -> list:
    """`decode(source)` for each, on a thread per core where there are several (Pillow lets
    go of the GIL while it decodes and resizes: 32 photos of 512 px, 90 -> ~50 ms on two
    cores); the first failure, in order, is raised. `decode` must not run torch ops: each
    thread would start an OpenMP pool of its own, and idle pools slow every other
    thread's (`lanes.release_threads`)."""
    from concurrent.futures import ThreadPoolExecutor

    from .lanes import cpu_cores

    workers = min(cpu_cores(), len(sources))
    if workers < 2:
        return [decode(s) for s in sources]
    with ThreadPoolExecutor(workers, thread_name_prefix="mmcore-decode") as pool:
        return list(pool.map(decode, sources))


def split_transform(transform) -> tuple:
    """(PIL part, tensor part) of a torchvision / timm `Compose`: the steps before its
    to-tensor step work on PIL images alone, so decoding threads may run them; a transform
    of another kind is all tensor part."""
    steps = getattr(transform, "transforms", None)
    if isinstance(steps, list):
        for i, step in enumerate(steps):
            if type(step).__name__ in _TO_TENSOR:
                return type(transform)(steps[:i]), type(transform)(steps[i:])
    return _unchanged, transform


def _unchanged(image):
    return image


class DualEncoder:
    """The interface. Subclasses implement `_images(decoded)` and `_texts(strs)`
    (unnormalised), and may say what decoding threads make of each image (`_decode_image`)."""

    identity: str = ""
    logit_scale: float = 100.0
    logit_bias: float | None = None          # SigLIP-style models only
    max_text_tokens: int = 77
    image_batch: int = BATCH        # images per forward: chosen per model by measuring

    def __init__(self):
        # prompt text -> (D,) embedding; bounded by bytes: labels come from strangers
        self._text_cache = BytesLRU(TEXT_CACHE_BYTES)
        self._batchers: dict = {}                         # "images"/"texts" -> MicroBatcher

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def micro_batch(self, max_batch: int = BATCH, max_wait: float = 0.002) -> None:
        """Serve many users: small encode calls from concurrent requests share a forward."""
        from .microbatch import MicroBatcher

        self._batchers = {"images": MicroBatcher(self._encode_images, max_batch, max_wait),
                          "texts": MicroBatcher(self._encode_texts, max_batch, max_wait)}

    def encode_images(self, images) -> torch.Tensor:
        """(N, D) L2-normalised; images are PIL images or paths (checked by the safe loader)."""
        images = list(images)
        if "images" in self._batchers and 0 < len(images) < BATCH:
            return self._batchers["images"](images)
        return self._encode_images(images)

    def encode_texts(self, texts) -> torch.Tensor:
        """(N, D) L2-normalised."""
        texts = list(texts)
        if "texts" in self._batchers and 0 < len(texts) < BATCH:
            return self._batchers["texts"](texts)
        return self._encode_texts(texts)

    def _decode_image(self, src):
        """One image as `_images` takes it (a checked RGB PIL image here), made without
        torch ops: decoding threads run it (`decode_all`)."""
        return load_image(src)

    @torch.inference_mode()
    def _encode_images(self, images) -> torch.Tensor:
        out = []
        window = max(self.image_batch, DECODE_WINDOW)
        for first in range(0, len(images), window):
            decoded = decode_all(self._decode_image, images[first:first + window])
            for start in range(0, len(decoded), self.image_batch):
                out.append(F.normalize(self._images(decoded[start:start + self.image_batch])
                                       .float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def _encode_texts(self, texts) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), BATCH * 4):
            out.append(F.normalize(self._texts(list(texts[start:start + BATCH * 4])).float(),
                                   dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def text_embeddings_cached(self, texts: list) -> torch.Tensor:
        """encode_texts with a per-encoder LRU cache: known texts are not encoded again."""
        found = {t: self._text_cache.get(t) for t in dict.fromkeys(texts)}
        missing = [t for t, v in found.items() if v is None]
        if missing:
            # clone: a row of one big batch would keep the whole batch's storage alive
            fresh = [row.clone() for row in self.encode_texts(missing)]
            found.update(zip(missing, fresh))
            self._text_cache.update(zip(missing, fresh))
        return torch.stack([found[t] for t in texts])

    # ---- the training surface; `part` is "projections", "text" or "image" (see train.py)
    def tokenize(self, texts: list) -> dict:
        enc = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=self.max_text_tokens, return_tensors="pt")
        return dict(enc.to(self.device))

    def project(self, image_features, text_features) -> tuple:
        """Tower features -> L2-normalised embeddings in the shared space: (image, text)."""
        image_proj, text_proj = self._projections()
        return (F.normalize(image_proj(image_features), dim=-1),
                F.normalize(text_proj(text_features), dim=-1))

    def trainable_parameters(self, part: str) -> list:
        """The projections and the temperature; + the text tower ("text"); + both ("image")."""
        image_proj, text_proj = self._projections()
        params = [image_proj.weight, text_proj.weight, self.log_logit_scale]
        image_tower, text_tower = self._towers()
        if part in ("text", "image"):
            params += list(text_tower.parameters())
        if part == "image":
            params += list(image_tower.parameters())
        return params


# ------------------------------------------------------------------ 1. Hugging Face CLIP

def public_name(source: str) -> str:
    """A model's name fit to save and show: a hub id as is; a local folder by its name plus
    a digest of its full path (still unique per folder, without naming server paths)."""
    source = str(source)
    if not Path(source).is_absolute() and not source.startswith((".", "~")):
        return source
    digest = hashlib.sha256(source.encode("utf-8", "replace")).hexdigest()[:12]
    return f"{Path(source).name}@{digest}"


def weights_version(source: str) -> str:
    """For a local folder, a digest of its weight files' names, sizes and times: a model
    retrained into the same folder is another model (caches and saved indexes key on it)."""
    folder = Path(str(source)).expanduser()
    if not folder.is_dir():
        return ""
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns)
             for p in sorted(folder.glob("*.safetensors"))]
    return "#" + hashlib.sha256(repr(stats).encode()).hexdigest()[:10] if stats else ""


class ClipEncoder(DualEncoder):
    def __init__(self, model, processor, name: str):
        super().__init__()
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.identity = f"hf-clip:{public_name(name)}{weights_version(name)}"
        bias = getattr(model, "logit_bias", None)          # SiglipModel has one; CLIP has not
        self.logit_bias = float(bias.detach().reshape(-1)[0]) if bias is not None else None
        cfg = getattr(model.config, "text_config", model.config)
        self.max_text_tokens = getattr(cfg, "max_position_embeddings", 77)
        self.dim = getattr(model.config, "projection_dim", None)

    @property
    def logit_scale(self) -> float:
        """From the model's weights (they change when it is trained or loaded)."""
        scale = getattr(self.model, "logit_scale", None)
        return 100.0 if scale is None else float(scale.detach().exp())

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _images(self, pils):
        pixels = self.processor(images=pils, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, next(self.model.parameters()).dtype)
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    def _texts(self, texts):
        return self.model.get_text_features(**self.tokenize(texts)).pooler_output

    # ---- training surface
    @property
    def weights(self) -> nn.Module:
        return self.model

    @property
    def log_logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def _projections(self):
        return self.model.visual_projection, self.model.text_projection

    def _towers(self):
        return self.model.vision_model, self.model.text_model

    def trainable_copy(self, part: str, name: str) -> "ClipEncoder":
        """A copy to train, in fp32 even when the shared model runs bf16 (`fast`)."""
        import copy

        return ClipEncoder(copy.deepcopy(self.model).float(), self.processor, name)

    def image_inputs(self, pil) -> torch.Tensor:
        return self.processor.image_processor(images=[pil], return_tensors="pt")["pixel_values"][0]

    def tower_features(self, pixels=None, texts=None) -> tuple:
        """(pooled image features or None, pooled text features or None), before projection."""
        image = text = None
        if pixels is not None:
            image = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
        if texts is not None:
            text = self.model.text_model(**self.tokenize(texts)).pooler_output
        return image, text

    def save(self, folder, part: str = "image") -> None:
        """A CLIPModel folder (`from_pretrained` loads it, so does any tab), whatever the part."""
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)

    def load(self, folder) -> None:
        """The weights of a folder written by `save`, in place (every weight must be there)."""
        from safetensors.torch import load_file

        state = {}
        for f in sorted(Path(folder).glob("model*.safetensors")):     # shards too
            state.update(load_file(str(f)))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(f"'{Path(folder).name}' does not fit this model (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}).")
        self._text_cache.clear()


# ------------------------------------------------------------------ 2. tower dual encoder

@dataclass
class TowerConfig:
    image_backbone: str = "tf_efficientnet_lite0"   # a timm model name
    text_model: str = ""                            # HF folder or hub id of the text encoder
    image_dim: int = 1000                           # what the image backbone hands over
    text_dim: int = 384                             # what the text encoder hands over
    embed_dim: int = 384                            # the shared space
    init_logit_scale: float = 100.0                 # exp of the learnable log temperature
    conse_top_t: int = 0                            # > 0: ConSE image features (top-T probs)
    conse_temperature: float = 1.0                  # softmax temperature of those probs


class TowerDualEncoder(nn.Module, DualEncoder):
    """backbone -> features -> linear projection -> L2 norm, for each side."""

    # an inference copy of the image tower with its norms folded into its convs (`fast`:
    # precision.folded_twin), run where no gradient is taken; not a submodule, so it is
    # never trained, saved or copied into a trained fork
    serving_image_model = None

    def __init__(self, cfg: TowerConfig, image_model: nn.Module, transform, text_model: nn.Module,
                 tokenizer, name: str = "tower"):
        nn.Module.__init__(self)
        DualEncoder.__init__(self)
        self.cfg, self.transform, self.tokenizer = cfg, transform, tokenizer
        # decoding threads resize and crop (`_decode_image`); tensors are made in `_images`
        self._pil_stage, self._tensor_stage = split_transform(transform)
        self.image_model, self.text_model = image_model, text_model
        self.image_projection = nn.Linear(cfg.image_dim, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text_dim, cfg.embed_dim, bias=False)
        self.log_logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)).log())
        self.name = name
        self.max_text_tokens = min(getattr(text_model.config, "max_position_embeddings", 512), 256)
        self.dim = cfg.embed_dim

    @property
    def identity(self) -> str:
        digest = hashlib.sha256()
        for tensor in (self.image_projection.weight, self.text_projection.weight):
            digest.update(tensor.detach().cpu().float().numpy().tobytes())
        return f"tower:{self.name}:{digest.hexdigest()[:16]}"

    @property
    def logit_scale(self) -> float:
        return float(self.log_logit_scale.detach().exp().clamp(max=100.0))

    @property
    def device(self):
        return self.image_projection.weight.device

    def set_serving_image_model(self, module) -> None:
        object.__setattr__(self, "serving_image_model", module)    # not registered

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        # the tower's own dtype and layout in (bf16 / channels-last under `fast`), fp32 out
        tower = self.image_model
        if self.serving_image_model is not None and not torch.is_grad_enabled():
            tower = self.serving_image_model
        first = next(tower.parameters())
        layout = torch.channels_last if first.dim() == 4 and \
            first.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        pixels = pixels.to(dtype=first.dtype, memory_format=layout)
        feats = tower(pixels).float()                                     # (B, image_dim)
        if self.cfg.conse_top_t > 0:
            probs = (feats / self.cfg.conse_temperature).softmax(-1)
            top = probs.topk(self.cfg.conse_top_t, dim=-1)
            kept = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
            feats = kept / kept.sum(-1, keepdim=True)                     # convex weights
        return feats

    def text_features(self, enc: dict) -> torch.Tensor:
        hidden = self.text_model(**enc).last_hidden_state.float()         # (B, T, text_dim)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)          # masked mean

    def _decode_image(self, src):
        return self._pil_stage(load_image(src))

    def _images(self, pils):
        """`pils`: images through the transform's PIL steps (`_decode_image`)."""
        pixels = torch.stack([self._tensor_stage(im) for im in pils]).to(self.device)
        return self.image_projection(self.image_features(pixels))

    def _texts(self, texts):
        return self.text_projection(F.normalize(self.text_features(self.tokenize(texts)), dim=-1))

    def fork(self, copy_text: bool = False, copy_image: bool = False,
             name: str | None = None) -> "TowerDualEncoder":
        """A new encoder with its own head; towers shared (frozen use) or copied (to train)."""
        import copy

        # copies are trained: in fp32 even when the shared tower runs bf16 (`fast`)
        twin = TowerDualEncoder(self.cfg, copy.deepcopy(self.image_model).float() if copy_image
                                else self.image_model, self.transform,
                                copy.deepcopy(self.text_model).float() if copy_text
                                else self.text_model,
                                self.tokenizer, name or self.name)
        twin.load_state_dict({k: v for k, v in self.state_dict().items()
                              if not k.startswith(("image_model.", "text_model."))}, strict=False)
        if not copy_image:                                   # the same frozen image tower
            twin.set_serving_image_model(self.serving_image_model)
        return twin.eval().to(self.device)

    # ---- training surface
    @property
    def weights(self) -> nn.Module:
        return self

    def _projections(self):
        return self.image_projection, self.text_projection

    def _towers(self):
        return self.image_model, self.text_model

    def trainable_copy(self, part: str, name: str) -> "TowerDualEncoder":
        """Own head; the towers `part` trains copied, the others shared with this one."""
        return self.fork(copy_text=part in ("text", "image"), copy_image=part == "image",
                         name=name)

    def image_inputs(self, pil) -> torch.Tensor:
        return self.transform(pil)

    def tower_features(self, pixels=None, texts=None) -> tuple:
        """(image features or None, L2-normalised pooled text features or None)."""
        image = None if pixels is None else self.image_features(pixels.to(self.device))
        text = None if texts is None else F.normalize(self.text_features(self.tokenize(texts)),
                                                      dim=-1)
        return image, text

    def save(self, folder, part: str = "image") -> None:
        """The head, the towers `part` trains (the others are the base model's) as
        safetensors, and the config as JSON; default: everything."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"image_projection": self.image_projection.weight.detach().cpu().contiguous(),
                   "text_projection": self.text_projection.weight.detach().cpu().contiguous(),
                   "log_logit_scale": self.log_logit_scale.detach().cpu().reshape(1)},
                  str(folder / "head.safetensors"))
        for tower in TOWERS_TRAINED[part]:
            state = {k: v.detach().cpu().contiguous()
                     for k, v in getattr(self, tower).state_dict().items()}
            save_file(state, str(folder / f"{tower}.safetensors"))
        (folder / "tower_config.json").write_text(json.dumps(
            {**asdict(self.cfg), "base": self.name}, indent=2))

    def load(self, folder) -> None:
        """The weights of a folder written by `save`, in place: the head, and each tower the
        folder holds (fork with that tower copied first, or the shared one changes too)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        saved = json.loads((folder / "tower_config.json").read_text())
        if (saved.get("image_dim"), saved.get("text_dim"), saved.get("embed_dim")) != \
                (self.cfg.image_dim, self.cfg.text_dim, self.cfg.embed_dim):
            raise InputError(f"'{folder.name}' was trained from another tower model.")
        state = load_file(str(folder / "head.safetensors"))
        with torch.no_grad():
            self.image_projection.weight.copy_(state["image_projection"])
            self.text_projection.weight.copy_(state["text_projection"])
            self.log_logit_scale.copy_(state["log_logit_scale"][0])
        for tower in ("text_model", "image_model"):
            if (folder / f"{tower}.safetensors").exists():
                getattr(self, tower).load_state_dict(
                    load_file(str(folder / f"{tower}.safetensors")), strict=True)
                if tower == "image_model":              # its folded copy holds the old weights
                    self.set_serving_image_model(None)
        self._text_cache.clear()



# what a tower checkpoint holds besides the head, by the part that was trained
TOWERS_TRAINED = {"projections": (), "text": ("text_model",),
                  "image": ("text_model", "image_model")}


# ------------------------------------------------------------------ 3. ConSE

CONSE_TOP_T = 10
CLASS_TEMPLATE = "a photo of a {}."


def conse_encoder(classifier, transform, text_model, tokenizer,
                  classes: torch.Tensor) -> TowerDualEncoder:
    """The offline kit's dual encoder: ConSE expressed as a tower at step 0."""
    cfg = TowerConfig(text_model="all-MiniLM-L6-v2", image_dim=classes.shape[0],
                      text_dim=classes.shape[1], embed_dim=classes.shape[1],
                      conse_top_t=CONSE_TOP_T)
    enc = TowerDualEncoder(cfg, classifier, transform, text_model, tokenizer,
                           name="conse-efficientnet-lite0-minilm")
    with torch.no_grad():
        enc.image_projection.weight.copy_(classes.T)            # (D, classes)
        enc.text_projection.weight.copy_(torch.eye(cfg.text_dim))
    return enc.eval().to(classifier.conv_stem.weight.device)


def class_embeddings(text_model, tokenizer, class_names: list) -> torch.Tensor:
    """(1000, 384) MiniLM embeddings of the ImageNet class prompts, L2-normalised."""
    texts = [CLASS_TEMPLATE.format(n) for n in class_names]
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), 128):
            enc = tokenizer(texts[start:start + 128], padding=True, return_tensors="pt")
            hidden = text_model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def build_tower(cfg: TowerConfig, device=None, pretrained_image: bool = False,
                name: str = "tower") -> TowerDualEncoder:
    """A tower dual encoder from its config: a timm image backbone (pooled features; weights
    only where timm has them locally) and a Hugging Face text encoder (mean pooled, loaded
    safetensors-only through the same checks as every user-given model)."""
    import timm
    from timm.data import create_transform, resolve_data_config

    from .hub import load_role_model

    image_model = timm.create_model(cfg.image_backbone, pretrained=pretrained_image,
                                    num_classes=0)
    transform = create_transform(**resolve_data_config({}, model=image_model))
    text_model, tokenizer = load_role_model(cfg.text_model)
    cfg.image_dim = image_model.num_features
    cfg.text_dim = text_model.config.hidden_size
    enc = TowerDualEncoder(cfg, image_model.eval(), transform, text_model.eval(), tokenizer, name)
    return enc.eval().to(device or "cpu")


def load_encoder(folder, base: DualEncoder | None = None, device=None,
                 name: str | None = None) -> DualEncoder:
    """The dual encoder a folder written by `save` holds: a CLIPModel folder as is; a tower
    folder on top of `base` (the encoder it was trained from: its towers fill in those the
    folder lacks, e.g. ConSE's), or, without one, built from its config. `name` (a tower's;
    its identity, which saved indexes key on, includes it): default the folder's name."""
    folder = Path(folder)
    name = name or folder.name
    if (folder / "tower_config.json").exists():
        if base is None:
            raw = json.loads((folder / "tower_config.json").read_text())
            cfg = TowerConfig(**{k: v for k, v in raw.items()
                                 if k in TowerConfig.__dataclass_fields__})
            enc = build_tower(cfg, device, name=name)
        elif isinstance(base, TowerDualEncoder):
            enc = base.fork(copy_text=(folder / "text_model.safetensors").exists(),
                            copy_image=(folder / "image_model.safetensors").exists(),
                            name=name)
        else:
            raise InputError(f"'{folder.name}' is a tower checkpoint; {type(base).__name__} "
                             "cannot be its base.")
        enc.load(folder)
        return enc
    if (folder / "config.json").exists():
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained(folder, use_safetensors=True, trust_remote_code=False)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False)
        return ClipEncoder(model.eval().to(device or "cpu"), processor, str(folder))
    raise InputError(f"'{folder.name}' holds no dual encoder (no tower_config.json or "
                     "config.json).")
