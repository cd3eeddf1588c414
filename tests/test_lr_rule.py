"""Issue 26 (newcomer): one lr rule and one message for the API and the CLI."""

import math

import pytest
import torch

from quotientopt.compare import CONTENDERS, Settings
from quotientopt.optim import QuotientSGD


def test_api_and_cli_share_the_lr_rule():
    p = torch.nn.Parameter(torch.zeros(2))
    QuotientSGD([p], lr=0.0)  # lr = 0 is allowed, as in torch
    with pytest.raises(ValueError, match=r"finite number in \[0, inf\)") as api:
        QuotientSGD([p], lr=math.inf)
    assert "[0, inf]" not in str(api.value)
    name = next(iter(CONTENDERS))
    Settings(learning_rates={name: 0.0}).validate()
    with pytest.raises(ValueError, match=r"finite number in \[0, inf\)"):
        Settings(learning_rates={name: math.inf}).validate()
