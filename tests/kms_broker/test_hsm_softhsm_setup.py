"""SoftHSM token setup (kms_broker.hsm.softhsm): config, PIN handling, refusal cases."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from kms_broker.hsm import softhsm
from sealed.secrets import SecretBuffer
from tests.kms_broker.hsm_fixtures import (  # noqa: F401 - registers the fixtures
    SoftHsmToken,
    softhsm_config_fixture,
)


def test_write_config_is_private_and_idempotent(tmp_path: Path) -> None:
    config = softhsm.write_config(tmp_path / "state")
    text = config.config_path.read_text()
    assert f"directories.tokendir = {config.token_dir}\n" in text
    assert "objectstore.backend = file" in text
    assert stat.S_IMODE(os.stat(config.state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(config.token_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(config.config_path).st_mode) == 0o600
    assert softhsm.write_config(tmp_path / "state") == config


def test_init_token_keeps_pins_off_argv_and_env(
    softhsm_config: softhsm.SoftHsmConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[list[str], dict[str, str]]] = []
    real_run = subprocess.run

    def spy(args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((list(args), dict(kwargs.get("env") or os.environ)))
        return real_run(args, **kwargs)

    monkeypatch.setattr(softhsm.subprocess, "run", spy)
    so_pin, user_pin = "so-secret-7781", "user-secret-9923"
    with SecretBuffer.from_bytes(user_pin.encode()) as user:
        softhsm.init_token(softhsm_config.state_dir, "setup-pins", so_pin, user)
    assert len(seen) == 1
    args, env = seen[0]
    for pin in (so_pin, user_pin):
        assert not any(pin in a for a in args)
        assert not any(pin in v for v in env.values())
    # the token exists and the user PIN works, the SO PIN is not the user PIN
    token = SoftHsmToken(config=softhsm_config, module_path=softhsm.find_module(),
                         label="setup-pins", user_pin=user_pin, so_pin=so_pin)
    hsm = token.open_hsm()
    hsm.health()
    hsm.close()


def test_init_token_refuses_duplicates_and_bad_input(
    softhsm_config: softhsm.SoftHsmConfig,
) -> None:
    softhsm.init_token(softhsm_config.state_dir, "setup-dup", "so-pin-0001", "user-pin-0001")
    with pytest.raises(FileExistsError, match="setup-dup"):
        softhsm.init_token(softhsm_config.state_dir, "setup-dup", "so-pin-0002", "user-pin-0002")
    with pytest.raises(ValueError, match="PIN"):
        softhsm.init_token(softhsm_config.state_dir, "setup-x", "so", "user-pin-0001")
    with pytest.raises(ValueError, match="PIN"):
        softhsm.init_token(softhsm_config.state_dir, "setup-x", "so-pin-0001", "bad\npin00")
    with pytest.raises(ValueError, match="label"):
        softhsm.init_token(softhsm_config.state_dir, "x" * 33, "so-pin-0001", "user-pin-0001")
    with pytest.raises(TypeError):
        softhsm.init_token(softhsm_config.state_dir, "setup-x", 1234, "user-pin-0001")  # type: ignore[arg-type]
    # refused attempts left no half-made token behind
    assert all((d / "token.object").exists() for d in softhsm_config.token_dir.iterdir())
