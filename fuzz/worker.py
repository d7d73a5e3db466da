"""One harness under atheris/libFuzzer: ``python -m fuzz.worker NAME [libFuzzer args]``.

Started by ``python -m fuzz run`` (one process per harness). The project's packages are
imported inside ``atheris.instrument_imports`` so their branches guide the fuzzer; the
harness's lazy imports are pulled in by one pass over its corpus inside that context.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

# the project only: instrumenting PyYAML or the harnesses made the YAML harnesses ~100x slower
INSTRUMENTED = ["attest", "sealed", "kms_broker", "trainer", "compose"]


def main() -> None:
    import atheris

    name, args = sys.argv[1], sys.argv[2:]
    from fuzz.base import check, repo_root

    with atheris.instrument_imports(include=INSTRUMENTED):
        from fuzz.harnesses import get

        harness = get(name)
        for path in sorted((repo_root() / "fuzz" / "corpus" / name).glob("*")):
            # imports what the parser imports lazily, inside the instrumentation; a corpus
            # input that breaks the property is reported by the fuzzer itself
            with contextlib.suppress(Exception):
                check(harness, path.read_bytes())

    def one_input(data: bytes) -> None:
        check(harness, data)

    kwargs = {"custom_mutator": harness.mutator} if harness.mutator is not None else {}
    atheris.Setup([sys.argv[0], *args], one_input, **kwargs)
    atheris.Fuzz()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
