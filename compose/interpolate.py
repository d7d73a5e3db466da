"""Compose-style variable interpolation in string values.

Supported forms, as in the Compose specification:

    $$                 a literal ``$``
    $NAME  ${NAME}     the variable's value, or "" when unset
    ${NAME:-default}   default when NAME is unset or empty
    ${NAME-default}    default when NAME is unset
    ${NAME:?message}   error with message when NAME is unset or empty
    ${NAME?message}    error with message when NAME is unset
    ${NAME:+other}     other when NAME is set and non-empty, else ""
    ${NAME+other}      other when NAME is set, else ""

A default, message or alternative may itself contain interpolations (``${A:-${B}}``).
Anything else after ``$`` (``$1``, ``${}``, an unclosed ``${``) is an error, so a typo
never silently becomes an empty string.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from compose.errors import ComposeFileError

__all__ = ["interpolate"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")
MAX_DEPTH = 8


def interpolate(text: str, variables: Mapping[str, str], *, where: str = "value") -> str:
    """Return ``text`` with every interpolation replaced; ``where`` names it in errors."""
    result, end = _expand(text, 0, variables, where, depth=0, closing=False)
    assert end == len(text)
    return result


def _expand(
    text: str,
    pos: int,
    variables: Mapping[str, str],
    where: str,
    *,
    depth: int,
    closing: bool,
) -> tuple[str, int]:
    """Expand from ``pos`` to the end of text, or to the unmatched ``}`` when ``closing``."""
    if depth > MAX_DEPTH:
        raise ComposeFileError(f"{where}: interpolation nested deeper than {MAX_DEPTH} levels")
    out: list[str] = []
    i = pos
    while i < len(text):
        ch = text[i]
        if closing and ch == "}":
            return "".join(out), i
        if ch != "$":
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if nxt == "$":
            out.append("$")
            i += 2
            continue
        if nxt == "{":
            value, i = _braced(text, i + 2, variables, where, depth=depth)
            out.append(value)
            continue
        match = _NAME.match(text, i + 1)
        if match is None:
            raise ComposeFileError(
                f"{where}: invalid interpolation at {text[i:i + 10]!r}; write $$ for a literal $"
            )
        out.append(variables.get(match.group(), ""))
        i = match.end()
    if closing:
        raise ComposeFileError(f"{where}: unclosed '${{' in {text!r}")
    return "".join(out), i


def _braced(
    text: str, pos: int, variables: Mapping[str, str], where: str, *, depth: int
) -> tuple[str, int]:
    match = _NAME.match(text, pos)
    if match is None:
        raise ComposeFileError(f"{where}: invalid variable name after '${{' in {text!r}")
    name = match.group()
    i = match.end()
    if i < len(text) and text[i] == "}":
        return variables.get(name, ""), i + 1
    operator = next((op for op in _OPERATORS if text.startswith(op, i)), None)
    if operator is None:
        raise ComposeFileError(f"{where}: invalid interpolation of {name!r} in {text!r}")
    argument, end = _expand(
        text, i + len(operator), variables, where, depth=depth + 1, closing=True
    )
    value = variables.get(name)
    is_set = value is not None
    is_nonempty = bool(value)
    present = is_nonempty if operator.startswith(":") else is_set
    kind = operator[-1]
    if kind == "-":
        return (value if present else argument) or "", end + 1
    if kind == "+":
        return (argument if present else ""), end + 1
    if not present:
        raise ComposeFileError(f"{where}: required variable {name} is missing: {argument}")
    return value or "", end + 1
