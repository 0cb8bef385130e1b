#!/usr/bin/env python3
"""Writes tests/fixtures/precision/: transformers' float64 loss of a SmolLM2-shaped Llama
(SmolLM2's vocabulary of 49152, head dim 64, grouped-query attention, tied embeddings,
rope theta 100000; 2 layers of width 192 to keep the test fast) whose weights are a
formula, so the fixture is a config and a few numbers rather than 40 MB of weights.

    /work/venv/bin/python scripts/make_precision_fixture.py     (or .venv/bin/python)

Weights: tensor number t (in the order of WEIGHTS below), element i (row-major):
    u = ((i * 2654435761 + t * 40503 + 12345) mod 2^32) / 2^32
    w = (2u - 1) * scale_t          computed in float64, stored as float32
with scale_t = 0.5 for the embedding (logits spread over ±15, as a trained LM's), 1 + 0.2·(2u−1)
for norm gains, and sqrt(3 / fan_in) for the projections. Tokens: batch row b, position
p: (b * 7919 + p * 104729 + 13) mod vocab. crates/candor-model/tests/precision.rs builds
the same weights, runs candor's f32 forward and loss (the fused CPU kernels) and must
land within 2e-5 of the float64 mean loss here (candor's eval loss on SmolLM2 was 1.3e-4
from transformers' f64 before the reductions were accumulated in f64).

Writes config.json (transformers' LlamaConfig) and reference.json: tokens, float64 mean
next-token loss, float32 loss of the same model in transformers, versions.
"""
import json
import os

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "precision")
VOCAB, HIDDEN, LAYERS, HEADS, KV, INTER, BATCH, T = 49152, 192, 2, 3, 1, 512, 2, 256


def weight_names():
    names = ["model.embed_tokens.weight"]
    for l in range(LAYERS):
        p = f"model.layers.{l}."
        names += [p + "input_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + "post_attention_layernorm.weight"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names + ["model.norm.weight"]


def formula(t, shape, name):
    n = int(np.prod(shape))
    i = np.arange(n, dtype=np.uint64)
    h = (i * np.uint64(2654435761) + np.uint64(t * 40503 + 12345)) % np.uint64(2**32)
    u = h.astype(np.float64) / 2.0**32
    if name.endswith("norm.weight"):
        w = 1.0 + 0.2 * (2 * u - 1)
    elif "embed_tokens" in name:
        w = 0.5 * (2 * u - 1)
    else:
        w = (2 * u - 1) * np.sqrt(3.0 / shape[-1])
    return w.astype(np.float32).reshape(shape)


def main():
    os.makedirs(OUT, exist_ok=True)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV,
                      head_dim=HIDDEN // HEADS, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for t, name in enumerate(weight_names()):
            p = params[name]
            p.copy_(torch.from_numpy(formula(t, tuple(p.shape), name)))
    model.tie_weights()
    assert len(params) == len(weight_names()), sorted(set(params) - set(weight_names()))
    tokens = [[(b * 7919 + p * 104729 + 13) % VOCAB for p in range(T)] for b in range(BATCH)]
    ids = torch.tensor(tokens)
    losses = {}
    for dtype in (torch.float64, torch.float32):
        m = model.to(dtype)
        with torch.no_grad():
            logits = m(input_ids=ids).logits.double()
        lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None])[..., 0]
        losses[str(dtype).split(".")[-1]] = -lp.mean().item()
    cfg.save_pretrained(OUT)
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump({"tokens": tokens, "mean_loss_f64": losses["float64"],
                   "mean_loss_f32_transformers": losses["float32"],
                   "weights": weight_names(), "torch": torch.__version__,
                   "transformers": transformers.__version__}, f)
    print(f"f64 loss {losses['float64']:.9f}, transformers f32 {losses['float32']:.9f} "
          f"(diff {losses['float32'] - losses['float64']:.2e})")


if __name__ == "__main__":
    main()
