"""The network: a GPT-2 shaped decoder-only Transformer.

    tokens (B, T) -> token + position embeddings -> n_layer x Block -> LayerNorm -> logits (B, T, V)
    Block: x + Attention(LayerNorm(x)), then x + MLP(LayerNorm(x))   (pre-LayerNorm)

The LM head shares its weight with the token embedding (tied embeddings), and the two
projections that write into the residual stream start with a smaller standard
deviation (scaled by 1/sqrt(2 * n_layer)) so the stream's variance does not grow with
depth at initialisation, as in GPT-2.

Two options depart from GPT-2 (config.position and config.norm): rotary position
embeddings ("rope", Su et al. 2021), which turn each query and key by angles that grow
with its position, so attention scores depend on relative distance and there is no
position table; and RMSNorm (Zhang & Sennrich 2019), a LayerNorm without centring or
bias.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """Attention written out step by step; the reference for the fused kernel.

    q: (B, n_head, T, head_size) queries; k, v: (B, n_head, S, head_size) keys and values.
    mask: bool, broadcastable to (B, n_head, T, S), True where a query may look at a key;
    None means plain causal attention: the T queries are the last T of the S positions,
    and each sees itself and every position before it.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, S)
    if mask is None:
        mask = causal_mask(q.size(-2), k.size(-2), q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.softmax(scores, dim=-1)
    weights = F.dropout(weights, p=dropout_p)
    return weights @ v  # (B, nh, T, head_size)


def causal_mask(T: int, S: int, device=None) -> torch.Tensor:
    """(T, S) bool: query i, at position S - T + i, sees keys 0 .. S - T + i."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


ROPE_BASE = 10000.0  # wavelengths of the rotary pairs run from 2*pi to about 2*pi*ROPE_BASE positions


class Rotary(nn.Module):
    """Cosines and sines of rotary position embeddings for positions 0 .. block_size - 1.

    Feature pair i of a head (features i and i + head_size/2) at position p is rotated
    by the angle p * ROPE_BASE^(-2i / head_size). The dot product of a query rotated at
    p and a key rotated at p' then depends on p - p' only.
    """

    def __init__(self, head_size: int, block_size: int):
        super().__init__()
        frequencies = ROPE_BASE ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
        angles = torch.arange(block_size, dtype=torch.float64)[:, None] * frequencies[None, :]  # (block, hs/2)
        # Not saved in checkpoints: a function of the config, rebuilt on load.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (B, T) -> cos, sin shaped to broadcast over (B, n_head, T, hs/2)."""
        cos, sin = self.cos[positions], self.sin[positions]
        if positions.dim() == 1:
            return cos[None, None], sin[None, None]
        return cos[:, None], sin[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[..., i], x[..., i + hs/2]) of x (B, nh, T, hs) by its angle."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1).type_as(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` positions.

    Generation runs the prompt through the model once (prefill), then feeds one new
    token per step (decode); each step appends that token's keys and values here
    instead of recomputing those of the whole context.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype=torch.float32):
        head_size = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions filled so far; the same for every row

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) after the filled positions; return all keys and values so far."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, steps: int) -> None:
        """Mark ``steps`` more positions as filled, once every layer has appended them."""
        self.length += steps

    def reset(self) -> None:
        self.length = 0

    def rollback(self, length: int) -> None:
        """Forget every position from ``length`` on: speculative decoding drops the keys and
        values of the draft tokens the target rejected. The cache is indexed by position,
        so this only shortens it; the next append overwrites what was there."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll a KV cache of {self.length} positions back to {length}")
        self.length = length

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep, for each new row i, the cache of old row rows[i] (beam search's reshuffle)."""
        self.keys = self.keys.index_select(1, rows)
        self.values = self.values.index_select(1, rows)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only the past."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.use_sdpa = cfg.attention == "sdpa"
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # queries, keys, values in one matmul
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C). mask: see explicit_attention. With a cache, x holds only the new
        positions and attends to every cached one too. rotation: (cos, sin) from Rotary for
        x's positions; keys are cached already rotated, as each depends on its own position only."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): each head attends independently
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rotation is not None:
            q, k = apply_rotary(q, *rotation), apply_rotary(k, *rotation)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, nh, S, hs), S = cached + T
        dropout_p = self.dropout if self.training else 0.0
        if self.use_sdpa:
            T, S = q.size(-2), k.size(-2)
            if mask is None and 1 < T < S:  # the fused kernel's is_causal assumes T == S
                mask = causal_mask(T, S, q.device)
            # mask None: causal (T == S), or one new query that sees every cached key (T == 1)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None and T > 1
            )
        else:
            y = explicit_attention(q, k, v, mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU, project back.

    GELU is exact (x * Phi(x), with the error function) or, with activation "gelu_tanh",
    the tanh approximation GPT-2 was trained with (its gelu_new); the two differ by up
    to about 5e-4, enough to matter for matching GPT-2's logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """One Transformer layer: attention then MLP, each on a normalised copy added back."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, layer, rotation)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The language model: token ids in, next-token logits (and optionally the loss) out."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set (it comes from the dataset) before building GPT")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # token embedding
        if cfg.position == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # learned absolute positions
        else:
            self.rotary = Rotary(cfg.n_embd // cfg.n_head, cfg.block_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix reads and writes tokens
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Trainable parameters, counting the tied embedding/head matrix once."""
        return sum(p.numel() for p in self.parameters())

    def summary(self) -> str:
        """One line: size and shape, as train.py and sample.py info print it."""
        c = self.config
        return (f"{self.num_params() / 1e6:.2f}M parameters, {c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, "
                f"context {c.block_size}, vocab {c.vocab_size}, {c.position} positions, {c.norm}")

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        pad: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next-token logits for every position of ``idx`` (B, T).

        targets: (B, T) next tokens; when given, the mean cross-entropy is returned too.
        cache: a KVCache holding the keys and values of the positions before ``idx``;
            ``idx`` is appended after them and the cache advances by T.
        pad: (B,) how many positions at the start of each row (cached ones included) are
            left padding: they are never attended to, and each row's positions count from
            its first real token, so a padded row computes what it would alone.
        last_only: return logits (B, 1, V) for the last position only (what generation needs).
        Returns (logits, loss or None).
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        longest = start + T - (int(pad.min()) if pad is not None else 0)  # real positions of the longest row
        if longest > self.config.block_size:
            raise ValueError(f"sequence of length {longest} exceeds block_size {self.config.block_size}")
        positions = torch.arange(start, start + T, device=idx.device)
        mask = None  # plain causal attention (see explicit_attention): the fused kernel's fast path
        if pad is not None:
            positions = (positions[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
            mask = self._padding_mask(start, T, pad)
        x = self.wte(idx)  # (B, T, C)
        rotation = None
        if self.config.position == "learned":
            x = x + self.wpe(positions)
        else:
            rotation = self.rotary(positions)
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, mask, cache, layer, rotation)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(self.ln_f(x))  # (B, T or 1, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    @staticmethod
    def _padding_mask(start: int, T: int, pad: torch.Tensor) -> torch.Tensor:
        """Bool mask (B, 1, T, start + T): query i (at position start + i) sees key j
        when j <= start + i and j is not padding. A padding query sees itself only, so no
        row of the softmax is empty (an empty row would make NaNs that leak through 0 * NaN)."""
        keys = torch.arange(start + T, device=pad.device)
        queries = torch.arange(start, start + T, device=pad.device)
        causal = keys[None, :] <= queries[:, None]  # (T, S)
        real_key = keys[None, :] >= pad[:, None]  # (B, S)
        itself = keys[None, :] == queries[:, None]  # (T, S)
        return ((causal[None] & real_key[:, None, :]) | itself[None])[:, None]  # (B, 1, T, S)
