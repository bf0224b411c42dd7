"""The `tiny` kit: small random models of the hub kit's classes, made deterministically.

Each is built from a fixed seed and a fixed corpus, saved as a normal HF folder (safetensors
plus tokenizer / processor files) under `$MMCORE_CACHE/models/tiny-*`, and then loaded through
the very same `from_pretrained` path as the hub kit, so tests exercise that code path.
Context lengths match the real models (BERT 512, GPT-2 1024, CLIP text 77).
"""

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cache

VERSION = "1"
SEED = 0

# A fixed English corpus for the tokenizers: sentences plus ImageNet class names.
SENTENCES = """\
The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.
A photo of a cat sitting on a red sofa. A dog runs across the green grass in the park.
The astronaut floats above the earth. A cup of hot coffee on a wooden table.
She opened the door and walked into the kitchen. He reads a book every night before sleep.
The rocket launched into the blue sky. Two horses stand in a field under the sun.
Water boils at one hundred degrees. The opposite of hot is cold and the opposite of up is down.
I am going to the market to buy some bread, milk and eggs. They were happy to see us!
Machine learning models learn patterns from data. Attention is all you need.
"""


@dataclass(frozen=True)
class TinySizes:
    hidden: int = 32          # width of every tiny transformer
    layers: int = 2           # depth
    heads: int = 2            # attention heads
    ffn: int = 64             # feed-forward width
    vocab: int = 1000         # target BPE / WordPiece vocabulary size
    image_size: int = 32      # tiny CLIP vision input (pixels)
    patch: int = 8            # tiny CLIP patch size
    projection: int = 16      # tiny CLIP shared-space dimension


SIZES = TinySizes()


def corpus() -> list:
    lines = [s for s in SENTENCES.splitlines() if s.strip()]
    try:
        from timm.data import ImageNetInfo
    except ImportError:         # a GPU box with torch and transformers only: fewer words
        return lines
    return lines + [f"a photo of a {n}." for n in ImageNetInfo().label_names()]


@contextlib.contextmanager
def seeded(seed: int = SEED):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def bert_tokenizer():
    import string
    from collections import Counter

    from transformers import BertTokenizer

    words = Counter(w for line in corpus() for w in
                    "".join(c if c.isalnum() else " " for c in line.lower()).split())
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab_list = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    budget = SIZES.vocab - len(vocab_list)
    vocab_list += [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))
                   if w not in vocab_list][:budget]
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab_list)})


def bpe_tokenizer(cls, end_of_word: str = ""):
    """A byte-level BPE tokenizer of class `cls` (GPT-2 or CLIP style), built deterministically.

    The `tokenizers` trainer breaks ties in hash order, so two runs differ; instead every
    frequent corpus word adds the merges that spell it left to right. Any byte sequence
    still tokenizes (the 256 byte symbols are all in the vocabulary).
    """
    from collections import Counter

    from tokenizers import pre_tokenizers

    base = cls()  # an empty tokenizer of the class: its normalizer and pre-tokenizer
    backend = base.backend_tokenizer
    words = Counter()
    for line in corpus():
        if backend.normalizer is not None:
            line = backend.normalizer.normalize_str(line)
        words.update(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(line))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = dict.fromkeys(base.all_special_tokens)
    vocab.update(dict.fromkeys(alphabet))
    if end_of_word:
        vocab.update(dict.fromkeys(c + end_of_word for c in alphabet))
    merges = []
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        symbols = list(word)
        symbols[-1] += end_of_word
        current = symbols[0]
        for symbol in symbols[1:]:
            if len(vocab) >= SIZES.vocab:
                break
            if current + symbol not in vocab:
                vocab[current + symbol] = None
                merges.append((current, symbol))
            current += symbol
    return cls(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


def build_bert(folder: Path) -> None:
    from transformers import BertConfig, BertForPreTraining

    tok = bert_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=SIZES.hidden,
                        num_hidden_layers=SIZES.layers, num_attention_heads=SIZES.heads,
                        intermediate_size=SIZES.ffn, max_position_embeddings=512,
                        pad_token_id=tok.pad_token_id)
    with seeded():
        # pre-training model: both heads (MLM + NSP) in one checkpoint, as bert-base-uncased
        model = BertForPreTraining(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def build_gpt2(folder: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    tok = bpe_tokenizer(GPT2Tokenizer)
    config = GPT2Config(vocab_size=len(tok), n_embd=SIZES.hidden, n_layer=SIZES.layers,
                        n_head=SIZES.heads, n_inner=SIZES.ffn, n_positions=1024,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with seeded():
        model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def build_clip(folder: Path) -> None:
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              CLIPTokenizer)

    tok = bpe_tokenizer(CLIPTokenizer, end_of_word="</w>")
    text = dict(vocab_size=len(tok), hidden_size=SIZES.hidden, intermediate_size=SIZES.ffn,
                num_hidden_layers=SIZES.layers, num_attention_heads=SIZES.heads,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=SIZES.hidden, intermediate_size=SIZES.ffn,
                  num_hidden_layers=SIZES.layers, num_attention_heads=SIZES.heads,
                  image_size=SIZES.image_size, patch_size=SIZES.patch)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=SIZES.projection)
    with seeded():
        model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIZES.image_size},
                                         crop_size={"height": SIZES.image_size,
                                                    "width": SIZES.image_size})
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)


BUILDERS = {"bert": build_bert, "gpt2": build_gpt2, "clip": build_clip}


def folder(name: str) -> Path:
    """The tiny model `name` ("bert", "gpt2" or "clip") as a saved HF folder, built once."""
    from filelock import FileLock

    final = cache.models_dir() / f"tiny-{name}"
    key = f"tiny-{name}-v{VERSION}"
    if cache.is_complete(final, key):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if not cache.is_complete(final, key):
            with cache.atomic_folder(final, key) as tmp:
                BUILDERS[name](tmp)
    return final
