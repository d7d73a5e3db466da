"""A sample text corpus that needs no download: the docstrings of Python's standard library.

The text is English prose with code in it, a few hundred KiB, deterministic for a given
interpreter, and licensed under the PSF licence like the interpreter itself. One document per
module; a canary line can be planted in one of them so tests and the demo can prove that the
plaintext never reaches disk.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

MODULES = [
    "abc",
    "argparse",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "concurrent.futures",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "gettext",
    "glob",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "mailbox",
    "math",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
    "zlib",
]


def module_text(name: str) -> str:
    module = importlib.import_module(name)
    parts = [inspect.getdoc(module) or ""]
    for attr_name, obj in sorted(vars(module).items()):
        if attr_name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        doc = inspect.getdoc(obj)
        if doc:
            parts.append(f"{attr_name}\n{doc}")
    return "\n\n".join(p for p in parts if p) + "\n"


def write_corpus(folder: Path, *, canary: str | None = None, limit: int | None = None) -> int:
    """Write one text file per module into ``folder``; returns the total size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for i, name in enumerate(MODULES[:limit]):
        text = module_text(name)
        if canary is not None and i == len(MODULES[:limit]) // 2:
            text += f"\n{canary}\n"
        data = text.encode()
        (folder / f"{name}.txt").write_bytes(data)
        total += len(data)
    return total
