"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations


class LungedgeError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


def display_name(name) -> str:
    """A file name for one line of human output: as it is, or quoted with escapes (``'new\\nline.png'``) when
    it holds a control character (a newline would break the line in two) or bytes that are not UTF-8."""
    name = str(name)
    return name if name.isprintable() else repr(name)


def check_choice(value, allowed, what: str):
    """Return ``value`` if it is one of ``allowed``; otherwise raise a one-line :class:`LungedgeError`.

    ``what`` names the thing chosen, e.g. ``"precision"`` or ``"--group-by"``:
    ``unknown precision 'fp8' (choose from fp32, fp16, int8)``.
    """
    allowed = list(allowed)
    if value not in allowed:
        raise LungedgeError(f"unknown {what} {value!r} (choose from {', '.join(map(str, allowed))})")
    return value
