"""Checks every piece of user text passes before it reaches a tokenizer."""

from .errors import InputError

MAX_CHARS = 10_000   # far above any model's context; rejects 1 MB payloads before tokenizing


def clean_text(text, what: str = "Text", max_chars: int = MAX_CHARS,
               allow_empty: bool = False) -> str:
    """The text, checked: a string, within `max_chars`, valid Unicode, not blank; NULs dropped."""
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise InputError(f"{what} must be a string, not {type(text).__name__}.")
    if len(text) > max_chars:
        raise InputError(f"{what} is {len(text):,} characters long; the limit is {max_chars:,}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{what} contains an invalid character at position {exc.start} "
                         "(a lone surrogate such as \\ud800).") from None
    text = text.replace("\x00", "")
    if not allow_empty and not text.strip():
        raise InputError(f"{what} is empty.")
    return text


def parse_words(value, what: str = "Target words", max_items: int = 100) -> list:
    """Comma- or newline-separated words (or a list) -> unique, stripped, in order."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else \
        clean_text(value, what, allow_empty=True).replace("\n", ",").split(",")
    words = []
    for item in items:
        word = clean_text(item, what, max_chars=200, allow_empty=True).strip()
        if word and word not in words:
            words.append(word)
    if len(words) > max_items:
        raise InputError(f"{what}: {len(words)} given; the limit is {max_items}.")
    return words
