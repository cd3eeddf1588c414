"""Issue 26.8: every entry point refuses a model without attention with the same error."""

import pytest
import torch

from quotientopt.nn import convert
from quotientopt.optim import muon_and_adamw
from quotientopt.symmetry import audit


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


@pytest.mark.parametrize("entry", [convert, muon_and_adamw, audit], ids=lambda f: f.__name__)
def test_model_without_attention_is_refused(entry):
    mlp = _mlp()
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{entry.__name__}: found no attention module") as info:
        entry(mlp)
    assert "register_attention" in str(info.value) and "torch.optim" in str(info.value)
    assert all(torch.equal(v, mlp.state_dict()[k]) for k, v in before.items())


def test_unconverted_attention_is_told_to_convert():
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match=r"convert it first"):
        muon_and_adamw(model)


def test_convert_of_a_converted_model_is_a_no_op():
    model = convert(torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2)))
    assert convert(model) is model
