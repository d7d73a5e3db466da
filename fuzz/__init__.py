"""Coverage-guided fuzzing of every parser of untrusted bytes (atheris / libFuzzer).

See ``docs/fuzzing.md``: the harnesses (``fuzz/harnesses``), the property each one checks
(:mod:`fuzz.base`), the in-repo corpus (``fuzz/corpus``) that ``make test`` replays, and
``make fuzz FUZZ_SECONDS=...``. Nothing here is imported by the product.
"""
