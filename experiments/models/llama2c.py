"""The Llama-2 architecture as karpathy/llama2.c's model.py writes it: RMSNorm, RoPE, SwiGLU, tied embeddings.

Module and parameter names are llama2.c's (tok_embeddings, layers.{i}.attention.wq, ...,
norm, output), so its checkpoints load and metaopt.param_groups.llama2c_blocks finds the layers.
One change: forward(tokens) always returns the logits of every position, shape (B, T, vocab),
and leaves the loss to the trainer (llama2.c computes it inside forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    # llama2.c's defaults for its 15M model, the paper's TinyStories model
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # fewer than n_heads for grouped-query attention; None means n_heads
    vocab_size: int = 32000  # the Llama 2 tokenizer
    multiple_of: int = 32  # the SwiGLU hidden width is rounded up to a multiple of this
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    dropout: float = 0.0

    @property
    def hidden_dim(self) -> int:
        """llama2.c's rule: 2/3 of 4 * dim (SwiGLU has three matrices, not two), rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 even under autocast, as llama2.c does
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def precompute_freqs(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE rotation angles, each (max_seq_len, head_dim // 2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len).float(), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Rotate each consecutive pair of channels of x (B, T, heads, head_dim) by its position's angle."""
    x_r, x_i = x.float().reshape(x.shape[:-1] + (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[None, :, None, :], freqs_sin[None, :, None, :]  # broadcast over batch and heads
    out = torch.stack([x_r * cos - x_i * sin, x_r * sin + x_i * cos], dim=-1).flatten(3)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        if args.n_heads % self.n_kv_heads or args.dim % args.n_heads:
            raise ValueError(
                f"n_heads={args.n_heads} must divide dim={args.dim} and be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.resid_dropout = nn.Dropout(args.dropout)
        self.dropout = args.dropout

    def forward(self, x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cos, freqs_sin), apply_rotary_emb(k, freqs_cos, freqs_sin)
        # grouped-query attention: each key/value head serves n_heads // n_kv_heads query heads
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2)
        v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2)
        # heads into the batch dimension: (B, heads, T, head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        out = out.transpose(1, 2).contiguous().view(batch, seq_len, -1)
        return self.resid_dropout(self.wo(out))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: attention, then the feed-forward network."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cos, freqs_sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.dropout = nn.Dropout(params.dropout)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        # weight tying: the unembedding is the embedding (one parameter, counted and optimised once)
        self.tok_embeddings.weight = self.output.weight

        freqs_cos, freqs_sin = precompute_freqs(params.dim // params.n_heads, params.max_seq_len)
        self.register_buffer("freqs_cos", freqs_cos, persistent=False)
        self.register_buffer("freqs_sin", freqs_sin, persistent=False)

        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream (llama2.c picks w3 and wo)
        for name, p in self.named_parameters():
            if name.endswith(("w3.weight", "wo.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * params.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab_size) of the next token at every position of tokens (B, T)."""
        seq_len = tokens.shape[1]
        if seq_len > self.params.max_seq_len:
            raise ValueError(f"sequence of {seq_len} tokens is longer than max_seq_len={self.params.max_seq_len}")
        h = self.dropout(self.tok_embeddings(tokens))
        for layer in self.layers:
            h = layer(h, self.freqs_cos[:seq_len], self.freqs_sin[:seq_len])
        return self.output(self.norm(h))


def llama2c(
    vocab_size: int = 32000,
    max_seq_len: int = 256,
    dim: int = 288,
    n_layers: int = 6,
    n_heads: int = 6,
    n_kv_heads: int | None = None,
    multiple_of: int = 32,
    norm_eps: float = 1e-5,
    dropout: float = 0.0,
) -> Transformer:
    """A llama2.c Transformer; the defaults are its 15M model (15,191,712 parameters with vocab 32000)."""
    args = ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab_size,
        multiple_of=multiple_of,
        norm_eps=norm_eps,
        max_seq_len=max_seq_len,
        dropout=dropout,
    )
    return Transformer(args)


def llama2c_15m(vocab_size: int = 32000, max_seq_len: int = 256, dropout: float = 0.0) -> Transformer:
    """The paper's TinyStories model: llama2.c's 15M (dim 288, 6 layers, 6 heads)."""
    return llama2c(vocab_size, max_seq_len, dim=288, n_layers=6, n_heads=6, dropout=dropout)


def tiny_transformer(
    vocab_size: int, max_seq_len: int, dim: int = 64, n_layers: int = 2, n_heads: int = 4
) -> Transformer:
    """A llama2.c Transformer small enough for CPU runs and tests."""
    return llama2c(vocab_size, max_seq_len, dim=dim, n_layers=n_layers, n_heads=n_heads)
