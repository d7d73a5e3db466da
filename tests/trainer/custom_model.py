"""A user model factory (``tests.trainer.custom_model:make``) that remembers its instances,
so tests can check the shredder zeroed them."""

from __future__ import annotations

from torch import nn

from trainer.models import TinyGPT

INSTANCES: list[nn.Module] = []


def make(**params: object) -> nn.Module:
    model = TinyGPT(**params)  # type: ignore[arg-type]
    INSTANCES.append(model)
    return model


def not_a_module() -> object:
    return object()
