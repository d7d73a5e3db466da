"""Fast tests of kms_broker.limits and its config keys (no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kms_broker.config import ConfigError, load_config
from kms_broker.limits import Limits, RateLimiter, StreamSlots


def test_rate_limiter_is_a_token_bucket_per_identity() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_s=2, burst=3, clock=lambda: now[0])
    assert [limiter.allow("node:a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("node:b")  # another identity has its own bucket
    now[0] = 0.5  # one token back
    assert limiter.allow("node:a") and not limiter.allow("node:a")
    now[0] = 100.0  # refills to the burst, not beyond
    assert [limiter.allow("node:a") for _ in range(4)] == [True, True, True, False]


def test_slots_cap_per_key_and_in_all() -> None:
    slots = StreamSlots(per_key=2, total=3)
    assert slots.acquire("n1") and slots.acquire("n1") and not slots.acquire("n1")
    assert slots.acquire("n2") and not slots.acquire("n3")  # the total is reached
    slots.release("n1")
    assert slots.held("n1") == 1 and slots.acquire("n3")


@pytest.mark.parametrize("bad", [
    {"rate_per_s": 0}, {"burst": 0}, {"max_streams": 33}, {"streams_per_node": 40},
    {"inflight_per_identity": 17}, {"pending_uploads_per_tenant": True}, {"nope": 1},
])
def test_bad_limits_are_refused_with_the_key_named(tmp_path: Path, bad: dict) -> None:
    import yaml

    cfg = tmp_path / "broker.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": "s", "tls": {"ca": "c", "cert": "c", "key": "k"},
                                   "hsm": {"backend": "fake"}, "limits": bad}))
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert "limits" in str(info.value)


def test_limit_defaults_leave_the_handler_pool_to_unary_calls() -> None:
    limits = Limits()
    assert limits.max_streams <= 32 and limits.inflight_per_identity <= 16
    assert limits.streams_per_node <= limits.max_streams
