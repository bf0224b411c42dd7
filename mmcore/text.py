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


def as_number(value, what: str, low: float | None = None, high: float | None = None,
              integer: bool = False):
    """A finite number from a client (a float, an int or numeric text), within [low, high];
    whole when `integer`. NaN, inf and 1e400 get a clear message, never a crash."""
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{what} must be a number, not {str(value)[:20]!r}.") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise InputError(f"{what} must be a finite number, not {number}.")
    if integer:
        if number != int(number):
            raise InputError(f"{what} must be a whole number, not {number}.")
        number = int(number)
    if (low is not None and number < low) or (high is not None and number > high):
        raise InputError(f"{what} must be between {low} and {high}, not {number}.")
    return number
