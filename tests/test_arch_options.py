"""The architecture options of [model], each against an independent truth: the squared-ReLU
MLP, QK-norm, zero-initialised residual projections, an untied head, logit soft-capping;
and every combination of them trains through train()."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import model.gpt
import sample
import train
from model.checkpoint import load_checkpoint, load_for_generation, model_from_checkpoint, save_checkpoint
from model.config import TrainConfig, load_config
from model.errors import UserError
from model.generate import Context
from model.gpt import GPT, KVCache
from model.optim import build_optimizers
from model.perf import flops_per_token
from tests.conftest import records, tiny_config, tiny_run_overrides
from tests.gpt2_folders import write_folder


# --- activation = "relu2" -----------------------------------------------------------------

def test_relu2_mlp_is_relu_squared_between_the_two_linears():
    torch.manual_seed(0)
    mlp = GPT(tiny_config(activation="relu2")).blocks[0].mlp
    x = torch.randn(2, 5, 16)
    hidden = x @ mlp.fc.weight.T + mlp.fc.bias
    expected = torch.where(hidden > 0, hidden * hidden, 0.0) @ mlp.proj.weight.T + mlp.proj.bias
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=0)


# --- qk_norm ------------------------------------------------------------------------------

def queries_and_keys(net: GPT, idx: torch.Tensor, monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (q, k) every layer hands to attention (the model must use the explicit path)."""
    seen = []
    plain = model.gpt.explicit_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q, k))
        return plain(q, k, v, *args, **kwargs)

    monkeypatch.setattr(model.gpt, "explicit_attention", spy)
    with torch.no_grad():
        net(idx)
    return seen


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_qk_norm_gives_every_head_unit_rms_queries_and_keys(position, monkeypatch):
    torch.manual_seed(1)
    net = GPT(tiny_config(qk_norm=True, attention="explicit", position=position)).eval()
    with torch.no_grad():
        for block in net.blocks:
            block.attn.qkv.weight.mul_(10)  # raw q, k far from unit RMS, so norm_eps is negligible
    seen = queries_and_keys(net, torch.randint(37, (2, 12)), monkeypatch)
    assert len(seen) == 2
    for q, k in seen:
        for t in (q, k):  # (B, n_head, T, head_size): one RMS per head and position
            torch.testing.assert_close(t.pow(2).mean(-1).sqrt(), torch.ones(t.shape[:-1]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_makes_the_model_blind_to_the_scale_of_queries_and_keys(qk_norm):
    torch.manual_seed(2)
    net = GPT(tiny_config(qk_norm=qk_norm, n_embd=32)).eval()
    with torch.no_grad():
        for block in net.blocks:
            block.attn.qkv.weight.mul_(10)  # q, k of RMS near 1: norm_eps (1e-5) is negligible beside it
    scaled = GPT(tiny_config(qk_norm=qk_norm, n_embd=32)).eval()
    scaled.load_state_dict(net.state_dict())
    with torch.no_grad():
        for block in scaled.blocks:
            block.attn.qkv.weight[: 2 * 32].mul_(7)  # the query and key rows; values untouched
            block.attn.qkv.bias[: 2 * 32].mul_(7)
    idx = torch.randint(37, (2, 16))
    with torch.no_grad():
        same = torch.allclose(scaled(idx)[0], net(idx)[0], atol=1e-5, rtol=0)
    assert same == qk_norm


@pytest.mark.parametrize(("position", "attention"), [("learned", "sdpa"), ("rope", "explicit")])
def test_qk_norm_cache_matches_recomputation(position, attention):
    # prefill 5, a chunk of 4, then 1: the cached keys (stored normalised) give the logits
    # of one pass over all 10 tokens; and a whole generation does too.
    torch.manual_seed(3)
    cfg = tiny_config(qk_norm=True, position=position, attention=attention)
    net = GPT(cfg).eval()
    idx = torch.randint(37, (2, 10))
    with torch.no_grad():
        full = net(idx)[0]
        cache = KVCache(cfg, 2, 16, "cpu")
        parts = [net(idx[:, a:b], cache=cache)[0] for a, b in ((0, 5), (5, 9), (9, 10))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    cached, recomputed = follow_greedy(net, [1, 2, 3], "exact", 12), follow_greedy(net, [1, 2, 3], "none", 12)
    for a, b in zip(cached, recomputed):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def follow_greedy(net: GPT, prompt: list[int], window: str, steps: int) -> list[torch.Tensor]:
    """Each step's next-token logits of a greedy generation (window "none": no cache)."""
    context, seen = Context(net, [prompt], steps, window), []
    for _ in range(steps):
        logits = context.next_logits()[0]
        seen.append(logits)
        context.append(torch.tensor([int(logits.argmax())]))
    return seen


# --- zero_init_proj -----------------------------------------------------------------------

@pytest.mark.parametrize("zero_init_proj", [True, False])
def test_zero_init_proj_makes_every_block_start_as_the_identity(zero_init_proj):
    # Blocks that add nothing: logits = LayerNorm(token + position embedding) @ wte^T
    # (ln_f starts at weight 1, bias 0).
    torch.manual_seed(4)
    net = GPT(tiny_config(zero_init_proj=zero_init_proj)).eval()
    idx = torch.randint(37, (2, 16))
    embedded = net.wte.weight[idx] + net.wpe.weight[:16]
    embeddings_only = F.layer_norm(embedded, (16,), eps=1e-5) @ net.wte.weight.T
    with torch.no_grad():
        logits = net(idx)[0]
    assert torch.allclose(logits, embeddings_only, atol=1e-6, rtol=0) == zero_init_proj


def test_zero_initialised_projections_still_get_a_gradient():
    torch.manual_seed(5)
    net = GPT(tiny_config(zero_init_proj=True))
    idx = torch.randint(37, (2, 16))
    net(idx, idx)[1].backward()
    for block in net.blocks:
        assert block.attn.proj.weight.grad.abs().sum() > 0 and block.mlp.proj.weight.grad.abs().sum() > 0


# --- tie_head = false ---------------------------------------------------------------------

def test_an_untied_head_is_a_matrix_of_its_own_and_both_train():
    torch.manual_seed(6)
    net = GPT(tiny_config(tie_head=False))
    assert net.lm_head.weight is not net.wte.weight
    assert net.lm_head.weight.data_ptr() != net.wte.weight.data_ptr()
    assert net.num_params() == 7440 + 37 * 16  # the tied model's (test_model) + a head of V x C
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    idx = torch.randint(10, (4, 16))  # tokens 0..9 only
    net(idx, idx)[1].backward()
    # The embedding learns only through the lookup (rows of tokens seen); the head scores every token.
    assert net.wte.weight.grad[10:].abs().sum() == 0 and net.wte.weight.grad[:10].abs().sum() > 0
    assert (net.lm_head.weight.grad[10:].abs().sum(dim=1) > 0).all()
    with torch.no_grad():  # one plain gradient step
        for p in net.parameters():
            p -= 0.1 * p.grad
    assert not torch.equal(net.wte.weight, before["wte.weight"])
    assert not torch.equal(net.lm_head.weight, before["lm_head.weight"])


def test_an_untied_head_starts_like_the_embedding():
    head = GPT(tiny_config(tie_head=False, vocab_size=500)).lm_head.weight  # 8,000 draws of N(0, 0.02)
    assert abs(head.mean().item()) < 0.002 and 0.019 < head.std().item() < 0.021


def test_an_untied_head_costs_no_more_flops_than_a_tied_one():
    # The head's matmul is there either way; an untied embedding is then a lookup only.
    tied, untied = tiny_config(), tiny_config(tie_head=False)
    assert flops_per_token(untied, GPT(untied).num_params()) == flops_per_token(tied, GPT(tied).num_params())
    assert flops_per_token(untied, GPT(untied).num_params()) == 6 * 7184 + 6144  # test_train's, by hand


def test_muon_leaves_an_untied_head_to_adamw():
    net = GPT(tiny_config(tie_head=False))
    optimizers = build_optimizers(net, TrainConfig(optimizer="muon"), torch.device("cpu")).optimizers
    in_muon = {id(p) for group in optimizers["muon"].param_groups for p in group["params"]}
    in_adamw = {id(p) for group in optimizers["adamw"].param_groups for p in group["params"]}
    assert id(net.lm_head.weight) in in_adamw and id(net.wte.weight) in in_adamw
    assert id(net.lm_head.weight) not in in_muon


def test_an_untied_checkpoint_round_trips(tmp_path):
    torch.manual_seed(7)
    cfg = tiny_config(tie_head=False)
    net = GPT(cfg).eval()
    save_checkpoint(tmp_path / "c.pt", model=net, config={"model": vars(cfg), "train": {}},
                    tokenizer={"kind": "char", "chars": "abc"})
    loaded = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt")).eval()
    assert loaded.lm_head.weight is not loaded.wte.weight
    assert torch.equal(loaded.lm_head.weight, net.lm_head.weight) and torch.equal(loaded.wte.weight, net.wte.weight)
    idx = torch.randint(37, (2, 16))
    assert torch.equal(loaded(idx)[0], net(idx)[0])


def test_an_untied_run_trains_saves_and_samples(tiny_dataset, tmp_path, capsys):
    cfg = load_config(None, tiny_run_overrides(tiny_dataset, tmp_path, "tie_head=false", "max_iters=2",
                                               "eval_interval=2", "eval_iters=1", "warmup_iters=0"))
    train.train(cfg, progress=False)
    model_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model:"))
    assert "layernorm, untied head |" in model_line  # the log names the option
    net, _, _ = load_for_generation(tmp_path / "last.pt", torch.device("cpu"))
    assert net.lm_head.weight is not net.wte.weight and not torch.equal(net.lm_head.weight, net.wte.weight)
    assert sample.main([str(tmp_path / "last.pt"), "--prompt", "The", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_gpt2_is_tied_and_cannot_be_fine_tuned_untied(tmp_path, tiny_dataset):
    folder = write_folder(tmp_path / "gpt2")
    cfg = load_config(None, [f"init_from={folder}", f"data_dir={tiny_dataset}", "tie_head=false"])
    assert train.source_model_config(folder).tie_head
    with pytest.raises(UserError, match="model.tie_head = False but init_from has True"):
        train.adopt_init_shape(cfg, {"model.tie_head", "train.init_from", "train.data_dir"})


# --- logit_softcap ------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(cap=st.floats(0.5, 50.0), head_scale=st.floats(1.0, 2000.0), seed=st.integers(0, 2**16))
def test_softcapped_logits_are_cap_tanh_of_the_raw_ones(cap, head_scale, seed):
    torch.manual_seed(seed)
    raw_model = GPT(tiny_config()).eval()
    with torch.no_grad():
        raw_model.lm_head.weight.mul_(head_scale)  # the tied matrix: raw logits up to hundreds
    capped_model = GPT(tiny_config(logit_softcap=cap)).eval()
    capped_model.load_state_dict(raw_model.state_dict())
    idx = torch.randint(37, (2, 16))
    with torch.no_grad():
        raw, _ = raw_model(idx)
        capped, loss = capped_model(idx, idx)
    assert capped.abs().max() <= cap
    torch.testing.assert_close(capped, cap * torch.tanh(raw / cap))
    torch.testing.assert_close(loss, F.cross_entropy(capped.reshape(-1, 37), idx.reshape(-1)))  # the loss sees them


def test_generation_sees_the_capped_logits():
    torch.manual_seed(8)
    raw_model = GPT(tiny_config()).eval()
    with torch.no_grad():
        raw_model.lm_head.weight.mul_(500)
    capped_model = GPT(tiny_config(logit_softcap=3.0)).eval()
    capped_model.load_state_dict(raw_model.state_dict())
    prompt = [4, 5, 6]
    cached = follow_greedy(capped_model, prompt, "exact", 4)
    with torch.no_grad():
        raw = raw_model(torch.tensor([prompt]))[0][0, -1]
    torch.testing.assert_close(cached[0], 3.0 * torch.tanh(raw / 3.0))
    assert max(float(logits.abs().max()) for logits in cached) <= 3.0


# --- config -------------------------------------------------------------------------------

def test_every_option_is_off_by_default():
    cfg = tiny_config()
    assert (cfg.activation, cfg.qk_norm, cfg.zero_init_proj, cfg.tie_head, cfg.logit_softcap) == (
        "gelu", False, False, True, 0.0)


@pytest.mark.parametrize(("override", "message"), [
    ("activation=relu3", "model.activation must be one of 'gelu', 'gelu_tanh', 'relu2', got 'relu3'"),
    ("logit_softcap=-1", "model.logit_softcap must be >= 0 (0: off), got -1.0"),
    ("qk_norm=1", "model.qk_norm must be true or false, got 1"),
    ("tie_head=\"no\"", "model.tie_head must be true or false, got 'no'"),
    ("zero_init_proj=yes", "model.zero_init_proj must be true or false, got 'yes'"),
])
def test_bad_option_values_are_one_line_errors(override, message):
    with pytest.raises(UserError) as error:
        load_config(None, [override])
    assert str(error.value) == message


# --- every combination trains -------------------------------------------------------------

OPTIONS_ON = {"activation": "relu2", "qk_norm": True, "zero_init_proj": True, "tie_head": False, "logit_softcap": 10.0}
OPTIONS_OFF = {"activation": "gelu", "qk_norm": False, "zero_init_proj": False, "tie_head": True, "logit_softcap": 0.0}
# Which options are on (in OPTIONS_ON's order) in the runs of the default suite: every
# setting of every pair of options appears in one of these six (a covering array of
# strength 2); the other 26 of the 32 combinations run in the slow suite.
FAST_COMBINATIONS = [(0, 0, 0, 0, 0), (1, 1, 1, 1, 1), (0, 0, 0, 1, 1), (0, 1, 1, 0, 0), (1, 0, 1, 0, 1),
                     (1, 1, 0, 1, 0)]


def test_the_fast_combinations_cover_every_pair_of_options():
    pairs = {(i, j, row[i], row[j]) for row in FAST_COMBINATIONS for i, j in itertools.combinations(range(5), 2)}
    assert len(pairs) == 10 * 4


@pytest.mark.parametrize("on", [
    pytest.param(on, marks=() if on in FAST_COMBINATIONS else pytest.mark.slow, id="".join(map(str, on)))
    for on in itertools.product([0, 1], repeat=5)
])
def test_every_combination_of_the_options_trains_a_step(on, tiny_dataset, tmp_path):
    chosen = {key: (OPTIONS_ON if flag else OPTIONS_OFF)[key] for key, flag in zip(OPTIONS_ON, on)}
    overrides = [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in chosen.items()]
    cfg = load_config(None, tiny_run_overrides(tiny_dataset, tmp_path, *overrides, "max_iters=1", "eval_interval=1",
                                               "eval_iters=1", "warmup_iters=0"))
    result = train.train(cfg, progress=False)
    assert result.step == 1 and math.isfinite(result.val_loss)
    saved = load_checkpoint(tmp_path / "last.pt")["config"]["model"]
    assert {key: saved[key] for key in chosen} == chosen  # the options reached the saved model
    before, after = (line["val_loss"] for line in records(tmp_path))  # on the same validation batches
    assert before != after  # the step moved the weights
