"""model/arch.py: the output head the sparse top-k loss builds its logits from."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, tiny_random_model

from minima_cli.model.arch import plain_output_head


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
@pytest.mark.parametrize("tied", [True, False])
def test_logits_are_the_last_hidden_state_times_the_plain_head(kind, tied):
    # distill's sparse head relies on this contract of every supported family: with
    # logits_to_keep=[] the lm_head is skipped, and hidden_states[-1] (after the final norm)
    # times the head's weight gives the logits the full forward returns
    model = tiny_random_model(kind, tied=tied)
    batch = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    full = model(input_ids=batch).logits
    out = model(input_ids=batch, output_hidden_states=True,
                logits_to_keep=torch.zeros(0, dtype=torch.long))
    weight = plain_output_head(model)
    assert weight is model.lm_head.weight and out.logits.shape[1] == 0
    torch.testing.assert_close(out.hidden_states[-1] @ weight.T, full, atol=1e-5, rtol=1e-5)


def test_a_head_with_a_bias_is_not_plain():
    model = tiny_random_model("llama", tied=False)
    model.lm_head = torch.nn.Linear(32, 96, bias=True)
    assert plain_output_head(model) is None
