"""Structure-aware libFuzzer mutators for the tree-shaped formats (JSON, YAML).

Byte-level mutation almost never keeps JSON or YAML well-formed, so a parser's checks behind
the syntax (field types, ranges, nesting) would go unfuzzed. These mutators parse the input,
change one node of the tree (a value replaced by another type or a boundary value, a key
dropped or added, a list item duplicated or cut, a value moved from elsewhere in the
document), and serialize it again; now and then they fall back to libFuzzer's byte mutation
so the syntax errors stay covered. ``prefix`` bytes in front (a harness's selector byte) are
kept as they are.

atheris is imported only when a mutator runs, i.e. under the fuzzer.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from typing import Any

__all__ = ["json_mutator", "yaml_mutator"]

Mutator = Callable[[bytes, int, int], bytes]

_STRINGS = ("", "x", "0", "-1", "1e400", "ab" * 32, "00" * 48, "UpToDate", "OutOfDate",
            "Revoked", "2026-01-01T00:00:00Z", "2026-01-01", "not a date", "tpm2", "acme",
            "\u00e9\u4e2d", "a" * 300, "claims.job.steps < 5", "true", "1 +", "size(x)",
            "9" * 5000)
_NUMBERS = (0, 1, -1, 255, 256, 65535, 2**31, 2**63, 2**64, -(2**63), 10**30, 0.5, -0.0,
            1e308, math.inf, -math.inf, math.nan)


def _paths(node: Any, path: tuple = (), out: list | None = None, depth: int = 0) -> list:
    out = [] if out is None else out
    out.append(path)
    if depth > 12 or len(out) > 2000:
        return out
    if isinstance(node, dict):
        for k, v in node.items():
            _paths(v, (*path, k), out, depth + 1)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _paths(v, (*path, i), out, depth + 1)
    return out


def _get(node: Any, path: tuple) -> Any:
    for p in path:
        node = node[p]
    return node


def _new_value(rng: random.Random, donors: list[Any]) -> Any:
    r = rng.random()
    if r < 0.25 and donors:
        return rng.choice(donors)
    if r < 0.45:
        return rng.choice(_NUMBERS)
    if r < 0.65:
        return rng.choice(_STRINGS)
    if r < 0.75:
        return rng.choice((None, True, False))
    if r < 0.85:
        return [rng.choice(donors) if donors else 1 for _ in range(rng.randint(0, 3))]
    if r < 0.95:
        return {rng.choice(_STRINGS) or "k": rng.choice(_NUMBERS)}
    return [[[[]]]] if rng.random() < 0.5 else {"a": {"b": {"c": {}}}}


def mutate_tree(doc: Any, rng: random.Random) -> Any:
    """One structural change to a parsed document (returns the new root)."""
    paths = _paths(doc)
    donors = [_get(doc, p) for p in rng.sample(paths, min(8, len(paths))) if p]
    path = rng.choice(paths)
    target = _get(doc, path)
    r = rng.random()
    if isinstance(target, dict) and r < 0.3:
        if target and rng.random() < 0.5:
            del target[rng.choice(list(target))]
        else:
            key = rng.choice([*map(str, target), *_STRINGS[:8]]) or "k"
            target[key] = _new_value(rng, donors)
        return doc
    if isinstance(target, list) and r < 0.3:
        if target and rng.random() < 0.4:
            del target[rng.randrange(len(target))]
        elif target and rng.random() < 0.5:
            target.insert(rng.randrange(len(target) + 1), rng.choice(target))
        else:
            target.append(_new_value(rng, donors))
        return doc
    if not path:
        return _new_value(rng, donors) if rng.random() < 0.05 else doc
    parent = _get(doc, path[:-1])
    if isinstance(target, int) and not isinstance(target, bool) and rng.random() < 0.5:
        parent[path[-1]] = target + rng.choice((-1, 1, 256, -(2**32)))
    elif isinstance(target, str) and rng.random() < 0.3:
        cut = rng.randrange(len(target) + 1)
        parent[path[-1]] = target[:cut] + rng.choice(_STRINGS[:6]) + target[cut:]
    else:
        parent[path[-1]] = _new_value(rng, donors)
    return doc


def _tree_mutator(load: Callable[[bytes], Any], dump: Callable[[Any], bytes],
                  prefix: int) -> Mutator:
    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        import atheris

        rng = random.Random(seed)
        head, body = data[:prefix], data[prefix:]
        if len(head) < prefix:
            head = head + bytes(prefix - len(head))
        room = max(1, max_size - prefix)
        if rng.random() < 0.15:
            return head + atheris.Mutate(body, room)
        if prefix and rng.random() < 0.05:
            head = bytes([rng.randrange(256)]) + head[1:]
        try:
            doc = load(body)
            for _ in range(rng.randint(1, 3)):
                doc = mutate_tree(doc, rng)
            out = dump(doc)
        except Exception:  # not parsable (a byte-level mutant) or not dumpable: bytes then
            return head + atheris.Mutate(body, room)
        return (head + out)[:max_size]

    return mutate


def json_mutator(*, prefix: int = 0, canonical: bool = False) -> Mutator:
    """Mutate JSON; ``canonical``: serialize as the project's canonical JSON does."""

    def dump(doc: Any) -> bytes:
        if canonical:
            return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return json.dumps(doc).encode()

    return _tree_mutator(lambda b: json.loads(b.decode("utf-8")), dump, prefix)


def yaml_mutator(*, prefix: int = 0) -> Mutator:
    """Mutate YAML (safe_load, then safe_dump)."""
    import yaml

    # libyaml where PyYAML has it: the mutator's own parsing is not what is measured
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

    def load(b: bytes) -> Any:
        return yaml.load(b.decode("utf-8"), Loader=loader)  # noqa: S506 - a safe loader

    def dump(doc: Any) -> bytes:
        return yaml.dump(doc, Dumper=dumper, sort_keys=False, allow_unicode=True).encode()

    return _tree_mutator(load, dump, prefix)
