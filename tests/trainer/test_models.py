"""Built-in models and user factories."""

from __future__ import annotations

import pytest
import torch

from tests.trainer import custom_model
from trainer.models import Classifier, TinyGPT, build_model, model_adapter


def test_tiny_gpt_is_a_causal_byte_lm():
    torch.manual_seed(0)
    model = build_model("tiny-gpt", {"layers": 2, "d_model": 32, "heads": 4}, seq_len=16)
    assert isinstance(model, TinyGPT) and model_adapter(model) == "tokens"
    x = torch.randint(0, 256, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 256)
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 256  # changing a later token leaves earlier outputs alone
    out = model(y)
    assert torch.allclose(out[:, :10], logits[:, :10], atol=1e-6)
    assert not torch.allclose(out[:, 10:], logits[:, 10:])
    loss = TinyGPT.loss(logits, x)
    assert abs(float(loss) - torch.log(torch.tensor(256.0)).item()) < 0.5  # untrained


def test_classifier_and_user_factory():
    model = build_model("classifier", {"features": 8, "classes": 3}, seq_len=1)
    assert isinstance(model, Classifier) and model_adapter(model) == "features"
    assert model(torch.randn(5, 8)).shape == (5, 3)
    custom = build_model("tests.trainer.custom_model:make", {"d_model": 32, "heads": 2},
                         seq_len=8)
    assert custom is custom_model.INSTANCES[-1]


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("tiny-gpt", {"d_model": 30, "heads": 4}, "d_model (30) must be divisible by heads"),
        ("tiny-gpt", {"depth": 3}, "model.params for 'tiny-gpt'"),
        ("classifier", {"features": 8, "colour": "red"}, "model.params for 'classifier'"),
        ("no_such_module_x:make", {}, "cannot import factory"),
        ("tests.trainer.custom_model:missing", {}, "cannot import factory"),
        ("tests.trainer.custom_model:not_a_module", {}, "did not return an nn.Module"),
    ],
)
def test_model_errors_are_clear(name, params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_model(name, params, seq_len=8)


def test_sequence_longer_than_positions_is_refused():
    model = TinyGPT(d_model=16, heads=2, max_seq_len=8)
    with pytest.raises(ValueError, match="exceeds model max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
