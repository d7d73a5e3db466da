"""Every fuzz harness, by name (``python -m fuzz list`` prints them with what they fuzz)."""

from __future__ import annotations

import importlib

from fuzz.base import Harness

__all__ = ["MODULES", "all_harnesses", "get"]

# one module per family; each has HARNESSES() -> list[Harness]
MODULES = ("tpm2", "tee", "sealed", "tokens", "documents", "broker")


def all_harnesses() -> dict[str, Harness]:
    out: dict[str, Harness] = {}
    for module in MODULES:
        for h in importlib.import_module(f"fuzz.harnesses.{module}").HARNESSES():
            out[h.name] = h
    return out


def get(name: str) -> Harness:
    for module in MODULES:
        for h in importlib.import_module(f"fuzz.harnesses.{module}").HARNESSES():
            if h.name == name:
                return h
    raise KeyError(f"no fuzz harness named {name!r}")
