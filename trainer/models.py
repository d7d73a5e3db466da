"""Models: the built-in ``tiny-gpt`` and ``classifier``, or the user's ``module:factory``.

``tiny-gpt`` is a byte-level next-token language model (vocabulary 256, learned positions,
pre-norm transformer blocks, causal self-attention through ``F.scaled_dot_product_attention``,
tied input/output embeddings), as in pre-training. ``classifier`` is an MLP over a float
feature vector. A user factory is imported by ``module:factory`` and called with the job's
``model.params``; it must return an ``nn.Module`` and declares its adapter by an attribute
``adapter = "tokens" | "features"`` (default ``"tokens"``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Classifier", "TinyGPT", "build_model", "model_adapter"]

VOCAB = 256


class _Block(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    adapter = "tokens"

    def __init__(
        self,
        *,
        layers: int = 2,
        d_model: int = 128,
        heads: int = 4,
        max_seq_len: int = 512,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"model.params.d_model ({d_model}) must be divisible by heads")
        self.max_seq_len = max_seq_len
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(max_seq_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds model max_seq_len {self.max_seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    @staticmethod
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


class Classifier(nn.Module):
    adapter = "features"

    def __init__(self, *, features: int = 16, classes: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.features = features
        self.classes = classes
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @staticmethod
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target)


def build_model(name: str, params: Mapping[str, Any], *, seq_len: int) -> nn.Module:
    """Build a model by config name; errors name the parameter at fault."""
    kwargs = dict(params)
    try:
        if name == "tiny-gpt":
            kwargs.setdefault("max_seq_len", max(seq_len, 16))
            model: nn.Module = TinyGPT(**kwargs)
        elif name == "classifier":
            model = Classifier(**kwargs)
        else:
            module_name, _, attr = name.partition(":")
            try:
                factory = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as exc:
                raise ValueError(f"model.name {name!r}: cannot import factory ({exc})") from None
            model = factory(**kwargs)
            if not isinstance(model, nn.Module):
                raise ValueError(f"model.name {name!r}: factory did not return an nn.Module")
    except TypeError as exc:
        raise ValueError(f"model.params for {name!r}: {exc}") from None
    if model_adapter(model) not in ("tokens", "features"):
        raise ValueError(f"model {name!r}: adapter must be 'tokens' or 'features'")
    return model


def model_adapter(model: nn.Module) -> Literal["tokens", "features"]:
    return getattr(model, "adapter", "tokens")


def model_loss(model: nn.Module, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    fn = getattr(model, "loss", None)
    if fn is None:
        if model_adapter(model) == "tokens":
            return TinyGPT.loss(logits, target)
        return Classifier.loss(logits, target)
    return fn(logits, target)
