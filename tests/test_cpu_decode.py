"""The CPU decode fast path: the same values as nn.Linear, and the caller's model untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.cpu_decode import BlockedLinear, blocked_linear, for_decoding
from model.gpt import GPT
from tests.conftest import tiny_config


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out", [36, 37])  # 37: not a multiple of parts, the last columns go plain
def test_blocked_product_equals_the_plain_one(parts, bias, out):
    torch.manual_seed(7)
    weight, rows = torch.randn(out, 24), torch.randn(3, 24)
    b = torch.randn(out) if bias else None
    torch.testing.assert_close(blocked_linear(rows, weight, b, parts), F.linear(rows, weight, b), atol=1e-6, rtol=1e-5)


def test_blocked_layer_is_the_plain_layer_with_gradients_or_many_rows():
    torch.manual_seed(1)
    linear = nn.Linear(8, 6)
    layer = BlockedLinear(linear, parts=2)
    x = torch.randn(2, 3, 8, requires_grad=True)
    y = layer(x)  # gradients on: nn.Linear itself, so training through it works
    y.sum().backward()
    assert y.grad_fn is not None and x.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), atol=1e-6, rtol=1e-5)
        many = torch.randn(40, 8)
        torch.testing.assert_close(layer(many), linear(many), atol=1e-6, rtol=1e-5)


def test_the_decoding_copy_shares_every_parameter_and_gives_the_same_logits(two_threads):
    torch.manual_seed(2)
    model = GPT(tiny_config(vocab_size=31)).eval()
    fast = for_decoding(model, min_weight=0)
    assert fast is not model
    assert [p.data_ptr() for p in fast.parameters()] == [p.data_ptr() for p in model.parameters()]
    assert all(type(m) is not BlockedLinear for m in model.modules())  # the caller's modules are left alone
    assert sum(type(m) is BlockedLinear for m in fast.modules()) == 4 * 2 + 1  # 4 per block, and the LM head
    idx = torch.randint(31, (2, 1))
    with torch.no_grad():
        torch.testing.assert_close(fast(idx)[0], model(idx)[0], atol=1e-5, rtol=1e-5)
        model.blocks[0].mlp.fc.weight.mul_(2.0)  # a later change to the model is seen by the copy
        torch.testing.assert_close(fast(idx)[0], model(idx)[0], atol=1e-5, rtol=1e-5)


def test_the_fast_path_is_off_on_one_thread_and_for_small_matrices():
    torch.manual_seed(3)
    model = GPT(tiny_config(vocab_size=31)).eval()
    assert for_decoding(model, min_weight=0) is model  # the suite runs on one thread
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert for_decoding(model) is model  # every matrix of the tiny model is below the size where it helps
    finally:
        torch.set_num_threads(threads)
