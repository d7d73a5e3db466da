"""Positive controls for the leak scanners the canary tests rely on: they do find a planted
needle in a file and in a live process's memory."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.trainer.conftest import files_containing, memory_contains


def test_file_scanner_finds_needles_across_chunk_boundaries(tmp_path):
    needle = os.urandom(32)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "big.bin").write_bytes(b"\x00" * ((1 << 20) - 10) + needle + b"\x00")
    (tmp_path / "clean.bin").write_bytes(os.urandom(4096))
    hits = files_containing([tmp_path], [b"absent-needle", needle])
    assert hits == [(tmp_path / "a" / "big.bin", 1)]


def test_memory_scanner_finds_a_needle_in_a_live_process():
    needle = os.urandom(16).hex()
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; s = sys.stdin.readline(); print('ready', flush=True)"
         "; sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child.stdin.write(needle + "\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "ready"
        hits = memory_contains(child.pid, [needle.encode(), os.urandom(32)])
        assert hits and all(i == 0 for _, i in hits)
    finally:
        child.kill()
        child.wait()
