"""Errors with messages meant for the person using the tool.

Everything that reaches the UI or the API as a user-facing message derives from
`MmcoreError`; the app shows its text (escaped) and keeps serving. Anything else is a bug
and is logged with its stack trace.
"""


class MmcoreError(Exception):
    """Base class: the message is safe and useful to show to the user as-is."""


class InputError(MmcoreError, ValueError):
    """The request itself is bad (empty text, wrong parameter range, bad file...)."""


class ModelUnavailable(MmcoreError, RuntimeError):
    """A model cannot be loaded here: missing package, no network, incompatible checkpoint."""


def cli_status(body, interrupted: str = "interrupted") -> int:
    """Run a command line's `body()` and return its exit status: a bad argument or input is
    status 2 and a model that cannot load status 1, each an `error:` line on stderr, never a
    traceback; Ctrl-C is 130."""
    import sys

    try:
        return body()
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
