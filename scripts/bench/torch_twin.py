#!/usr/bin/env python3
"""PyTorch twin of candor's llama-style model, for benchmarking candor against eager PyTorch.

Plain PyTorch (no transformers), eager (no torch.compile), float32 on the CPU by default;
--device cuda runs it on the GPU, --dtype bf16 trains under torch.autocast(bfloat16) with
float32 master weights and AdamW state (what candor's `train.dtype: bf16` does) and
samples with bfloat16 weights and KV cache:
  token embedding (tied with the LM head)
  per block:  x = x + Attn(RMSNorm(x));  x = x + MLP(RMSNorm(x))
     RMSNorm: eps 1e-5, learned weight, x * rsqrt(mean(x^2) + eps) * w   (HF LlamaRMSNorm)
     Attn:    q/k/v/o projections without bias, rotary embeddings in the Hugging Face
              rotate_half convention (theta 10000), grouped-query attention (kv heads
              repeated as HF's repeat_kv), causal softmax attention via
              F.scaled_dot_product_attention (default, --attn sdpa) or plain
              matmul + mask + softmax (--attn math)
     MLP:     down_proj(silu(gate_proj(x)) * up_proj(x)), no bias
  final RMSNorm; logits = x @ embedding^T

Train mode: random tokens, next-token cross-entropy, backward, clip_grad_norm_(1.0),
AdamW(lr 3e-4, betas (0.9, 0.95), weight_decay 0.1 on all parameters, PyTorch's default
CPU implementation), zero_grad. Warm up --warmup steps (3), time --steps steps (10);
tokens/s = batch*ctx / median step time; FLOP/s uses
flops/step = 6*params*tokens + 12*layers*hidden*ctx*tokens.

Sample mode (--sample): batched generation with a KV cache, batch 8, a 16-token random
prompt, 128 new tokens, greedy or multinomial (temperature 1) sampling, under
torch.inference_mode. The cache is preallocated per layer ([B, kv_heads, max_len, head_dim],
written in place; --cache static, default) or grown with torch.cat each step (--cache concat,
what HF's DynamicCache does). One warm-up generation, then --sample-reps timed generations
(3); new tokens/s = batch*new_tokens / median wall time of a whole generation (prefill
included). FLOP/s for sampling counts forward flops only:
2*params per processed token + 4*layers*hidden*kv_len per token for attention scores/values.
RoPE tables cover prompt+new tokens even where that exceeds the shape's ctx (tiny: 144 > 128).

Usage:
  .venv/bin/python scripts/bench/torch_twin.py --shape tiny [--threads 2] [--json]
  .venv/bin/python scripts/bench/torch_twin.py --shape small --sample --json
  python3 scripts/bench/torch_twin.py --shape small --device cuda --dtype bf16 --json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    ctx: int
    vocab: int
    batch: int


SHAPES = {
    "tiny": Shape(layers=4, hidden=128, heads=4, kv_heads=4, intermediate=352, ctx=128, vocab=512, batch=16),
    "medium": Shape(layers=6, hidden=384, heads=6, kv_heads=6, intermediate=1024, ctx=256, vocab=4096, batch=8),
    "small": Shape(layers=8, hidden=256, heads=4, kv_heads=4, intermediate=704, ctx=256, vocab=8192, batch=8),
}

ROPE_THETA = 10000.0
RMS_EPS = 1e-5


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = RMS_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def rope_tables(head_dim: int, max_len: int, theta: float = ROPE_THETA):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    pos = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # [L, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # HF layout: [L, hd]
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, hd]; cos/sin: [T, hd]
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


class Attention(nn.Module):
    def __init__(self, s: Shape, attn: str):
        super().__init__()
        self.heads, self.kv_heads = s.heads, s.kv_heads
        self.head_dim = s.hidden // s.heads
        self.attn = attn
        self.q_proj = nn.Linear(s.hidden, s.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(s.hidden, s.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(s.hidden, s.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(s.heads * self.head_dim, s.hidden, bias=False)

    def _attend(self, q, k, v, causal: bool):
        # q: [B, H, Tq, hd]; k, v: [B, H, Tk, hd] (already repeated for GQA)
        if self.attn == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if causal:
            tq, tk = q.shape[-2], k.shape[-2]
            mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    def forward(self, x, cos, sin, cache=None, pos: int = 0):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, pos)
        n_rep = self.heads // self.kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        # Prefill (t > 1) is causal; a one-token decode step attends to the whole cache.
        out = self._attend(q, k, v, causal=t > 1)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.up_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.down_proj = nn.Linear(s.intermediate, s.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, s: Shape, attn: str):
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden)
        self.self_attn = Attention(s, attn)
        self.post_attention_layernorm = RMSNorm(s.hidden)
        self.mlp = MLP(s)

    def forward(self, x, cos, sin, cache=None, pos: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class StaticCache:
    """Preallocated per-layer K/V buffers, written in place."""

    def __init__(self, b, kv_heads, max_len, head_dim, device="cpu", dtype=torch.float32):
        self.k = torch.zeros(b, kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(b, kv_heads, max_len, head_dim, device=device, dtype=dtype)

    def update(self, k, v, pos):
        t = k.shape[2]
        self.k[:, :, pos : pos + t] = k
        self.v[:, :, pos : pos + t] = v
        return self.k[:, :, : pos + t], self.v[:, :, : pos + t]


class ConcatCache:
    """Grown by torch.cat each step (HF DynamicCache style)."""

    def __init__(self, *_):
        self.k = self.v = None

    def update(self, k, v, pos):
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Twin(nn.Module):
    def __init__(self, s: Shape, attn: str, rope_len: int):
        super().__init__()
        self.s = s
        self.embed_tokens = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList([Block(s, attn) for _ in range(s.layers)])
        self.norm = RMSNorm(s.hidden)
        cos, sin = rope_tables(s.hidden // s.heads, rope_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, ids, caches=None, pos: int = 0):
        t = ids.shape[1]
        cos, sin = self.cos[pos : pos + t], self.sin[pos : pos + t]
        x = self.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i], pos)
        x = self.norm(x)
        return F.linear(x, self.embed_tokens.weight)  # tied LM head


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # .parameters() dedups the tied weight


class BackgroundLoad:
    """Fraction of the machine's CPU time used by OTHER processes while timing.

    On a small shared box a concurrent build skews the figures (and makes multi-threaded
    OpenMP regions wait for descheduled threads), so every result carries this number."""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        hz = os.sysconf("SC_CLK_TCK")
        others = (self._busy() - self.busy0) / hz - (self._own() - self.own0)
        self.frac = max(0.0, others) / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0

    @staticmethod
    def _busy() -> int:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except OSError:
            return 0
        return sum(v) - v[3] - v[4]  # minus idle, iowait

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(s: Shape, args) -> dict:
    dev = torch.device(args.device)
    model = Twin(s, args.attn, rope_len=s.ctx).to(dev)
    model.train()
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed)
    tokens = s.batch * s.ctx

    def step():
        data = torch.randint(0, s.vocab, (s.batch, s.ctx + 1), generator=g).to(dev)
        inputs, targets = data[:, :-1], data[:, 1:]
        with autocast:  # bf16: f32 master weights, matmuls in bf16, cross-entropy in f32
            logits = model(inputs)
            loss = F.cross_entropy(logits.reshape(-1, s.vocab), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    times, losses = [], []
    with BackgroundLoad() as bg:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    params = n_params(model)
    flops_per_step = 6 * params * tokens + 12 * s.layers * s.hidden * s.ctx * tokens
    return {
        "mode": "train",
        "params": params,
        "tokens_per_sec": tokens / med,
        "flops_per_sec": flops_per_step / med,
        "median_step_s": med,
        "steps": args.steps,
        "final_loss": losses[-1],
        "background_cpu_frac": round(bg.frac, 3),
    }


@torch.inference_mode()
def generate(model: Twin, prompt: torch.Tensor, new_tokens: int, sampling: str, cache_kind: str, g):
    s = model.s
    b, p = prompt.shape
    max_len = p + new_tokens
    cls = StaticCache if cache_kind == "static" else ConcatCache
    w = model.embed_tokens.weight
    caches = [cls(b, s.kv_heads, max_len, s.hidden // s.heads, w.device, w.dtype) for _ in range(s.layers)]
    logits = model(prompt, caches, pos=0)[:, -1]
    out = []
    pos = p
    for i in range(new_tokens):
        if sampling == "greedy":
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=g)
        out.append(nxt)
        if i + 1 == new_tokens:
            break
        logits = model(nxt, caches, pos=pos)[:, -1]
        pos += 1
    return torch.cat(out, dim=1)


def bench_sample(s: Shape, args) -> dict:
    b, p, n = args.sample_batch, args.prompt_len, args.new_tokens
    dev = torch.device(args.device)
    model = Twin(s, args.attn, rope_len=max(s.ctx, p + n)).to(dev)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)  # bf16 weights, activations and KV cache
    model.eval()
    g = torch.Generator(device=dev).manual_seed(args.seed)
    prompt = torch.randint(0, s.vocab, (b, p), generator=torch.Generator().manual_seed(args.seed)).to(dev)
    generate(model, prompt, min(n, 8), args.sampling, args.cache, g)  # warm-up
    sync(dev)
    times = []
    with BackgroundLoad() as bg:
        for _ in range(args.sample_reps):
            t0 = time.perf_counter()
            out = generate(model, prompt, n, args.sampling, args.cache, g)
            sync(dev)
            times.append(time.perf_counter() - t0)
            assert out.shape == (b, n)
    med = statistics.median(times)
    params = n_params(model)
    # forward flops: prefill p tokens + (n - 1) decode steps; attention over kv_len keys
    proc_tokens = p + (n - 1)
    attn_flops = sum(4 * s.layers * s.hidden * (kv) for kv in range(1, p + 1)) + sum(
        4 * s.layers * s.hidden * (p + i + 1) for i in range(n - 1)
    )
    flops = b * (2 * params * proc_tokens + attn_flops)
    return {
        "mode": "sample",
        "params": params,
        "tokens_per_sec": b * n / med,
        "flops_per_sec": flops / med,
        "median_generation_s": med,
        "sample_batch": b,
        "prompt_len": p,
        "new_tokens": n,
        "sampling": args.sampling,
        "cache": args.cache,
        "background_cpu_frac": round(bg.frac, 3),
    }


def selfcheck() -> None:
    """Checks the twin against transformers' LlamaForCausalLM (same weights), the math
    attention path against SDPA, GQA, and cached generation against full forwards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    for s in [SHAPES["tiny"], Shape(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96, ctx=32, vocab=100, batch=2)]:
        ids = torch.randint(0, s.vocab, (2, 24))
        twin = Twin(s, "sdpa", rope_len=s.ctx).eval()
        cfg = LlamaConfig(
            vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
            num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
            max_position_embeddings=s.ctx, rms_norm_eps=RMS_EPS, rope_theta=ROPE_THETA,
            tie_word_embeddings=True, attention_bias=False, mlp_bias=False, hidden_act="silu",
        )
        hf = LlamaForCausalLM(cfg).eval()
        sd = {"model." + k: v for k, v in twin.state_dict().items()}
        sd["lm_head.weight"] = twin.embed_tokens.weight
        missing, unexpected = hf.load_state_dict(sd, strict=False)
        assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
        with torch.no_grad():
            ref = hf(ids).logits
            got = twin(ids)
            for layer in twin.layers:
                layer.self_attn.attn = "math"
            got_math = twin(ids)
        err = (ref - got).abs().max().item()
        err_math = (ref - got_math).abs().max().item()
        assert err < 1e-4 and err_math < 1e-4, (err, err_math)
        # KV-cached greedy decoding == argmax of full forwards
        for cache in ("static", "concat"):
            prompt = ids[:, :8]
            out = generate(twin, prompt, 10, "greedy", cache, None)
            seq = prompt
            with torch.no_grad():
                for _ in range(10):
                    seq = torch.cat([seq, twin(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
            assert torch.equal(out, seq[:, 8:]), cache
        print(f"selfcheck ok: {s} max|twin-hf| sdpa {err:.2e} math {err_math:.2e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--attn", choices=["sdpa", "math"], default="sdpa")
    ap.add_argument("--sample", action="store_true", help="benchmark KV-cached generation instead of training")
    ap.add_argument("--sampling", choices=["multinomial", "greedy"], default="multinomial")
    ap.add_argument("--cache", choices=["static", "concat"], default="static")
    ap.add_argument("--sample-batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--sample-reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                    help="bf16: autocast training with f32 master weights; bf16 weights for sampling")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--selfcheck", action="store_true", help="compare with transformers' Llama and exit")
    args = ap.parse_args(argv)
    if args.selfcheck:
        selfcheck()
        return 0

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    s = SHAPES[args.shape]
    res = bench_sample(s, args) if args.sample else bench_train(s, args)
    out = {
        "impl": "pytorch",
        "shape": args.shape,
        "mode": res.pop("mode"),
        "params": res.pop("params"),
        "tokens_per_sec": res.pop("tokens_per_sec"),
        "flops_per_sec": res.pop("flops_per_sec"),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else 0,
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        "attn": args.attn,
        "torch": torch.__version__,
        **res,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"pytorch {out['shape']} {out['mode']} {out['dtype']} on {out['device']}: {out['params']:,} params, "
            f"{out['tokens_per_sec']:,.0f} tok/s, {out['flops_per_sec'] / 1e9:.2f} GFLOP/s, "
            f"peak RSS {out['peak_rss_bytes'] / 2**20:.0f} MiB, {out['threads']} threads, attn {out['attn']}, "
            f"other processes used {100 * out['background_cpu_frac']:.0f}% of the CPUs meanwhile"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
