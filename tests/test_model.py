"""The network: shapes, parameter count, attention paths, causality, initial loss, learning."""

from __future__ import annotations

import math

import pytest
import torch

from model.gpt import GPT, explicit_attention
from tests.conftest import tiny_config


def test_logits_shape_and_loss(tiny_model):
    idx = torch.randint(37, (3, 10))
    logits, loss = tiny_model(idx)
    assert logits.shape == (3, 10, 37)
    assert loss is None
    _, loss = tiny_model(idx, idx)
    assert loss.shape == ()


def test_parameter_count_matches_hand_formula():
    # V*C (tokens, shared with the head) + T*C (positions) + 2C (final norm)
    # + per layer: qkv 3C*C+3C, proj C*C+C, fc 4C*C+4C, proj 4C*C+C, two norms 4C = 12C^2 + 13C
    V, T, L, C = 37, 16, 2, 16
    expected = V * C + T * C + 2 * C + L * (12 * C * C + 13 * C)  # 592 + 256 + 32 + 2 * 3280
    assert GPT(tiny_config()).num_params() == expected == 7440


def test_parameter_count_without_bias():
    V, T, L, C = 37, 16, 2, 16  # no biases: norms keep only their weight (C), linears none
    expected = V * C + T * C + C + L * (12 * C * C + 2 * C)
    assert GPT(tiny_config(bias=False)).num_params() == expected


def test_explicit_attention_equals_sdpa():
    torch.manual_seed(1)
    fused = GPT(tiny_config(attention="sdpa")).eval()
    plain = GPT(tiny_config(attention="explicit")).eval()
    plain.load_state_dict(fused.state_dict())
    idx = torch.randint(37, (4, 16))
    torch.testing.assert_close(plain(idx)[0], fused(idx)[0], atol=1e-5, rtol=0)


def test_explicit_attention_by_hand():
    # One head, two positions, head_size 1: q = k = [1, 2], v = [10, 20].
    # Position 0 sees only itself -> 10. Position 1: scores [2*1, 2*2] = [2, 4],
    # softmax -> [1/(1+e^2), e^2/(1+e^2)], output 10/(1+e^2) + 20 e^2/(1+e^2).
    q = k = torch.tensor([1.0, 2.0]).view(1, 1, 2, 1)
    v = torch.tensor([10.0, 20.0]).view(1, 1, 2, 1)
    out = explicit_attention(q, k, v).flatten()
    w = math.exp(2) / (1 + math.exp(2))
    torch.testing.assert_close(out, torch.tensor([10.0, 10 * (1 - w) + 20 * w]))


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_causality(attention):
    torch.manual_seed(2)
    model = GPT(tiny_config(attention=attention)).eval()
    idx = torch.randint(37, (1, 12))
    changed = idx.clone()
    changed[0, 7:] = (changed[0, 7:] + 5) % 37
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :7], after[:, :7], atol=0, rtol=0)
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_initial_loss_is_close_to_uniform():
    # Small initial weights make the logits nearly equal: loss ~ ln(V).
    torch.manual_seed(3)
    vocab = 500
    model = GPT(tiny_config(vocab_size=vocab, n_embd=32)).eval()
    idx = torch.randint(vocab, (8, 16))
    _, loss = model(idx, torch.randint(vocab, (8, 16)))
    assert abs(loss.item() - math.log(vocab)) < 0.05


def test_overfits_one_batch():
    torch.manual_seed(4)
    model = GPT(tiny_config(n_embd=32))
    x = torch.randint(37, (2, 16))
    y = torch.randint(37, (2, 16))  # random targets: only memorising can fit them
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(100):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_longer_than_block_size_is_refused(tiny_model):
    with pytest.raises(ValueError, match="block_size"):
        tiny_model(torch.zeros(1, 17, dtype=torch.long))


def test_tied_embeddings(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.wte.weight


# --- architecture options: rotary positions, RMSNorm ---------------------------------------

def test_rotary_by_hand():
    # head_size 2: one pair, frequency ROPE_BASE^0 = 1, so position p turns (x0, x1) by p radians.
    from model.gpt import Rotary, apply_rotary

    rotary = Rotary(head_size=2, block_size=4)
    x = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2).expand(1, 1, 4, 2)
    turned = apply_rotary(x, *rotary(torch.arange(4)))[0, 0]
    expected = torch.tensor([[math.cos(p), math.sin(p)] for p in range(4)])
    torch.testing.assert_close(turned, expected)


def test_rotary_scores_depend_on_relative_position_only():
    from model.gpt import Rotary, apply_rotary

    torch.manual_seed(7)
    rotary = Rotary(head_size=8, block_size=32)
    q, k = torch.randn(2, 8)

    def score(p: int, p_key: int) -> float:
        cos, sin = rotary(torch.tensor([p, p_key]))
        turned_q = apply_rotary(q.view(1, 1, 1, 8).expand(1, 1, 2, 8), cos, sin)[0, 0, 0]
        turned_k = apply_rotary(k.view(1, 1, 1, 8).expand(1, 1, 2, 8), cos, sin)[0, 0, 1]
        return float(turned_q @ turned_k)

    for p, p_key, shift in [(5, 2, 10), (9, 9, 7), (3, 0, 28)]:
        assert score(p, p_key) == pytest.approx(score(p + shift, p_key + shift), abs=1e-5)
    assert score(0, 0) == pytest.approx(float(q @ k), abs=1e-6)  # position 0: no rotation


def test_rmsnorm_by_hand():
    # x = [3, 4]: root mean square sqrt((9 + 16) / 2) = sqrt(12.5); unit weights at init.
    model = GPT(tiny_config(n_embd=2, n_head=1, norm="rmsnorm"))
    out = model.ln_f(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(out, torch.tensor([[3.0, 4.0]]) / math.sqrt(12.5), atol=1e-5, rtol=0)


def test_parameter_count_with_rope_and_rmsnorm():
    V, L, C = 37, 2, 16  # no position table; each norm keeps only its weight (C)
    expected = V * C + C + L * (12 * C * C + 9 * C + 2 * C)  # linears keep biases: 3C + C + 4C + C = 9C
    assert GPT(tiny_config(position="rope", norm="rmsnorm")).num_params() == expected


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_rope_model_is_causal_and_both_attention_paths_agree(attention):
    torch.manual_seed(8)
    model = GPT(tiny_config(position="rope", attention=attention)).eval()
    idx = torch.randint(37, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 5) % 37
    torch.testing.assert_close(model(idx)[0][:, :7], model(changed)[0][:, :7], atol=0, rtol=0)
    other = GPT(tiny_config(position="rope", attention="explicit" if attention == "sdpa" else "sdpa")).eval()
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(idx)[0], model(idx)[0], atol=1e-5, rtol=0)
