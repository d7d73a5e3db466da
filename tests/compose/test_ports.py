"""Ports handed to services by number: outside the kernel's ephemeral range and reserved
across processes, so neither a port-0 bind nor another run of this code is handed them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from compose import ports
from compose.ports import free_port, free_port_pairs, release

CHILD = """
import json, sys
from compose import ports
print(json.dumps([ports._reserve(p) for p in json.loads(sys.argv[1])]))
"""


def _child_can_reserve(numbers: list[int]) -> list[bool]:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(numbers)],
                         capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def test_pairs_lie_outside_the_ephemeral_range_and_are_free():
    low, high = ports._ephemeral_range()
    chosen = free_port_pairs(4)
    assert len(set(chosen)) == 4
    for port in chosen:
        for p in (port, port + 1):
            assert not low <= p <= high
            with socket.socket() as s:  # free: a service can bind it now
                s.bind(("127.0.0.1", p))
    with socket.socket() as s:  # what the kernel hands out is never one of them
        s.bind(("127.0.0.1", 0))
        assert low <= s.getsockname()[1] <= high
    for port in chosen:
        release(port)
        release(port + 1)


def test_a_reservation_holds_across_processes_until_released():
    port = free_port()
    pair = free_port_pairs(1)[0]
    assert _child_can_reserve([port, pair, pair + 1]) == [False, False, False]
    release(port)
    assert _child_can_reserve([port]) == [True]  # the child exits: its reservation ends
    release(pair)
    release(pair + 1)
