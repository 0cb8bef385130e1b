#!/usr/bin/env python3
"""Writes tests/fixtures/parity/: tiny random-weight Hugging Face checkpoints of every
architecture candor loads, with transformers' outputs on fixed inputs, and checks that
checkpoints candor writes load in transformers with the same outputs.

    bash scripts/setup_venv.sh                      # once: torch, transformers, gguf in .venv
    .venv/bin/python scripts/make_parity_fixtures.py

Part 1, HF -> candor (read by crates/candor-model/tests/parity.rs). For each fixture DIR:
    DIR/config.json, DIR/model.safetensors (or shards + index)   save_pretrained output
    DIR/reference.safetensors   input_ids (B, T) i64, logits (B, T, V) f32,
                                logprobs (B, T-1) f32 = log p(input_ids[:, t+1] | ..t),
                                padded_ids / padded_mask / padded_positions (B, T) i64 and
                                padded_logits (B, T, V) f32 (left padding, explicit
                                position ids), and for a score head scores (B, T) f32 and
                                pooled (B,) f32 (transformers' sequence-classification output)
    DIR/reference.json          prompts and their greedy continuations (20 tokens, no stop
                                token, argmax of a full forward each step), smallest
                                top-1/top-2 logit gap seen (so a float-level difference
                                cannot flip a token), versions
Weights are drawn wider than the usual 0.02 init (norm gains and biases too), so logits
are O(1) and every parameter matters. Computation in float32; bf16/f16 fixtures store
their weights in that dtype and the reference is computed from the stored values.

Also tests/fixtures/parity/llama-gguf: llama-tied's weights written as llama.cpp does
(GGUF names, q/k rows permuted by convert_hf_to_gguf.py's rule), F32 and Q8_0, with a
small byte-level BPE vocabulary, a ChatML template and tokenizer.ggml.pre = smollm, for
`candor import` (tests/interop.rs); and tests/fixtures/gpt2/reference.json, transformers'
GPT-2 tokenizer's ids for a few texts from the original encoder.json/vocab.bpe.

Part 2, candor -> HF (round trip). tests/fixtures/parity/candor-lm is a checkpoint trained
by `candor pretrain` (tiny, a few steps; trainer/ state dropped) and candor-score the same
backbone with a score head added by candor (examples/resave.rs). transformers loads them
as LlamaForCausalLM / LlamaForSequenceClassification with AutoTokenizer (chat template
included); their outputs go into the same reference files, plus transformers' token ids
for a text and its chat-template render, which the test compares with candor's.
Every Part-1 fixture is also re-saved by candor (examples/resave.rs) and loaded back in
transformers here: its logits must equal the reference (GPT-2 must come back as
GPT2LMHeadModel).

Deterministic: re-running reproduces the committed files (pinned versions, fixed seeds),
except candor-lm/candor-score, which are only made when absent (--remake-candor to redo).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import transformers
from safetensors.torch import save_file
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "parity")
VOCAB, HIDDEN, LAYERS, HEADS, KV, INTER, CTX = 128, 32, 2, 4, 2, 64, 64
GEN_TOKENS = 20

torch.set_grad_enabled(False)


def llama_kwargs(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=CTX,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return base


def fixtures():
    """name -> (model class, config, stored dtype, max_shard_size or None)."""
    return {
        "llama-tied": (LlamaForCausalLM, LlamaConfig(**llama_kwargs(tie_word_embeddings=True, rope_theta=10000.0)),
                       torch.float32, None),
        "llama-untied-bf16": (LlamaForCausalLM,
                              LlamaConfig(**llama_kwargs(tie_word_embeddings=False, rope_theta=500000.0)),
                              torch.bfloat16, None),
        "mistral-f16": (MistralForCausalLM, MistralConfig(**llama_kwargs(tie_word_embeddings=False, sliding_window=4096)),
                        torch.float16, None),
        "qwen2-sharded": (Qwen2ForCausalLM,
                          Qwen2Config(**llama_kwargs(tie_word_embeddings=False, rope_theta=1000000.0,
                                                     use_sliding_window=False)),
                          torch.float32, "30KB"),
        "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                             n_positions=CTX, bos_token_id=1, eos_token_id=2,
                                             activation_function="gelu_new"),
                 torch.float32, None),
        "llama-score": (LlamaForSequenceClassification,
                        LlamaConfig(**llama_kwargs(tie_word_embeddings=False, num_labels=1)), torch.float32, None),
    }


def randomize(model, gen):
    """Wide random weights: matrices N(0, 0.35/sqrt(fan_in)·3), gains 1 + N(0, 0.2), biases N(0, 0.1)."""
    for name, p in model.named_parameters():
        if p.ndim == 1:
            is_gain = name.endswith("weight")
            p.copy_((1.0 if is_gain else 0.0) + torch.randn(p.shape, generator=gen) * (0.2 if is_gain else 0.1))
        else:
            fan_in = p.shape[0] if "c_attn" in name or "c_fc" in name or ".c_proj" in name else p.shape[-1]
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / fan_in ** 0.5))
    model.tie_weights()


def inputs(gen):
    ids = torch.randint(3, VOCAB, (2, 16), generator=gen)
    # left padding: row 0 has 5 pad tokens (id 0), row 1 none
    padded = torch.randint(3, VOCAB, (2, 16), generator=gen)
    mask = torch.ones(2, 16, dtype=torch.long)
    padded[0, :5] = 0
    mask[0, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (7, 4)]
    return ids, padded, mask, positions, prompts


def greedy(model, prompt):
    """Greedy continuation by a full forward per step; returns tokens and the smallest top-2 gap."""
    seq = list(prompt)
    gap = float("inf")
    for _ in range(GEN_TOKENS):
        logits = model(torch.tensor([seq])).logits[0, -1]
        top = torch.topk(logits, 2).values
        gap = min(gap, float(top[0] - top[1]))
        seq.append(int(logits.argmax()))
    return seq[len(prompt):], gap


def references(model, gen, is_score):
    ids, padded, mask, positions, prompts = inputs(gen)
    ref = {"input_ids": ids, "padded_ids": padded, "padded_mask": mask, "padded_positions": positions}
    if is_score:
        body = model.model(input_ids=ids).last_hidden_state
        ref["scores"] = model.score(body)[..., 0].float().contiguous()
        ref["pooled"] = model(input_ids=ids).logits[:, 0].float().contiguous()
        body = model.model(input_ids=padded, attention_mask=mask, position_ids=positions).last_hidden_state
        ref["padded_scores"] = model.score(body)[..., 0].float().contiguous()
        return ref, {}
    logits = model(input_ids=ids).logits.float()
    ref["logits"] = logits.contiguous()
    ref["logprobs"] = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0].contiguous()
    ref["padded_logits"] = model(input_ids=padded, attention_mask=mask, position_ids=positions).logits.float().contiguous()
    gens, gaps = [], []
    for p in prompts:
        toks, gap = greedy(model, p)
        gens.append({"prompt": p, "greedy": toks})
        gaps.append(gap)
    return ref, {"generations": gens, "min_top2_gap": min(gaps)}


def write_reference(d, ref, meta):
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(d, "reference.safetensors"))
    meta = {**meta, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


def clean(d):
    for junk in ("generation_config.json",):
        p = os.path.join(d, junk)
        if os.path.exists(p):
            os.remove(p)


def make_hf_fixtures():
    for i, (name, (cls, cfg, dtype, shard)) in enumerate(fixtures().items()):
        gen = torch.Generator().manual_seed(1000 + i)
        torch.manual_seed(1000 + i)
        model = cls(cfg).eval()
        randomize(model, gen)
        d = os.path.join(OUT, name)
        shutil.rmtree(d, ignore_errors=True)
        model.to(dtype).save_pretrained(d, max_shard_size=shard) if shard else model.to(dtype).save_pretrained(d)
        clean(d)
        # the reference runs in float32 on exactly the stored (rounded) weights
        model = cls.from_pretrained(d, dtype=torch.float32).eval()
        ref, meta = references(model, gen, cls is LlamaForSequenceClassification)
        meta = {"architecture": cls.__name__, "stored_dtype": str(dtype).replace("torch.", ""), **meta}
        write_reference(d, ref, meta)
        gap = meta.get("min_top2_gap")
        print(f"{name}: {cls.__name__}, {meta['stored_dtype']}, files {sorted(os.listdir(d))}"
              + (f", min greedy top-2 gap {gap:.4f}" if gap is not None else ""))
        assert gap is None or gap > 1e-3, f"{name}: greedy decoding too close to a tie ({gap})"


def cargo(*args):
    subprocess.run(["cargo", *args], cwd=ROOT, check=True)


def resave(src, dst, head=None):
    extra = ["--head", head] if head else []
    cargo("run", "-q", "-p", "candor-model", "--example", "resave", "--", src, dst, *extra)


def make_candor_checkpoints(remake):
    lm, score = os.path.join(OUT, "candor-lm"), os.path.join(OUT, "candor-score")
    if remake or not os.path.isdir(lm):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = os.path.join(tmp, "pretrain.yaml")
            with open(cfg, "w") as f:
                f.write("seed: 7\ndata: {files: [data/corpus/fortunes.jsonl], vocab_size: 320, heldout_fraction: 0.05}\n"
                        "model: {hidden_size: 32, layers: 2, heads: 4, kv_heads: 2, ctx: 64, tie_embeddings: false}\n"
                        "train: {steps: 30, batch_size: 8, lr: 3.0e-3, warmup_steps: 3, eval_every: 0, "
                        "eval_batches: 2, log_every: 10, save_every: 0}\n")
            out = os.path.join(tmp, "lm")
            cargo("run", "-q", "-p", "candor-cli", "--bin", "candor", "--", "pretrain", "--config", cfg, "--out", out)
            shutil.rmtree(lm, ignore_errors=True)
            shutil.copytree(out, lm, ignore=shutil.ignore_patterns("trainer", "metrics.jsonl"))
    if remake or not os.path.isdir(score) or not os.path.isfile(os.path.join(score, "config.json")):
        shutil.rmtree(score, ignore_errors=True)
        resave(lm, score, head="score")


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Call me Ishmael?"},
        {"role": "assistant", "content": "Some years ago."}]
TEXT = "It was the best of times, it was the worst of times: 1234 whales!"


def candor_references():
    for name, auto, expect in [("candor-lm", AutoModelForCausalLM, "LlamaForCausalLM"),
                               ("candor-score", AutoModelForSequenceClassification, "LlamaForSequenceClassification")]:
        d = os.path.join(OUT, name)
        model = auto.from_pretrained(d, dtype=torch.float32).eval()
        assert type(model).__name__ == expect, f"{name}: transformers loaded {type(model).__name__}, expected {expect}"
        tok = AutoTokenizer.from_pretrained(d)
        text_ids = tok(TEXT, add_special_tokens=True)["input_ids"]
        chat = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)
        chat_ids = tok(chat, add_special_tokens=False)["input_ids"]
        assert tok.decode(text_ids) == TEXT, f"{name}: tokenizer does not round-trip"
        gen = torch.Generator().manual_seed(77)
        ref, meta = references(model, gen, expect.endswith("Classification"))
        ref["text_ids"] = torch.tensor([text_ids])
        ref["chat_ids"] = torch.tensor([chat_ids])
        meta = {"architecture": type(model).__name__, "text": TEXT, "chat": CHAT, "chat_render": chat, **meta}
        write_reference(d, ref, meta)
        print(f"{name}: transformers loads it as {type(model).__name__} with {type(tok).__name__}; "
              f"chat template renders {chat!r}")


def check_resaved():
    """Every HF fixture re-saved by candor loads in transformers with the same logits."""
    worst = 0.0
    for name, (cls, _, _, _) in fixtures().items():
        src = os.path.join(OUT, name)
        with tempfile.TemporaryDirectory() as tmp:
            dst = os.path.join(tmp, name)
            resave(src, dst)
            with open(os.path.join(dst, "config.json")) as f:
                arch = json.load(f)["architectures"][0]
            auto = AutoModelForSequenceClassification if "Classification" in arch else AutoModelForCausalLM
            model = auto.from_pretrained(dst, dtype=torch.float32).eval()
            assert type(model) is cls, f"{name}: candor's re-save loads as {type(model).__name__}, expected {cls.__name__}"
            from safetensors.torch import load_file
            ref = load_file(os.path.join(src, "reference.safetensors"))
            if cls is LlamaForSequenceClassification:
                got = model.score(model.model(input_ids=ref["input_ids"]).last_hidden_state)[..., 0]
                err = (got - ref["scores"]).abs().max().item()
            else:
                err = (model(input_ids=ref["input_ids"]).logits - ref["logits"]).abs().max().item()
            worst = max(worst, err)
            assert err < 1e-5, f"{name}: candor's re-save differs in transformers by {err}"
            print(f"{name}: candor re-save -> transformers {cls.__name__}, max abs logit error {err:.2e}")
    print(f"round trip candor -> transformers: worst max abs error {worst:.2e}")


GGUF_BIGRAMS = ["th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of", "ed", "is",
                "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha", "as", "ou", "io"]
GGUF_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows -> GGML interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_gguf_fixture():
    """llama-tied's weights as llama.cpp would write them (q/k permuted, GGUF names), F32 and
    Q8_0, with a small byte-level BPE vocabulary: `candor import` must give back the
    reference logits (F32 exactly; Q8_0 within quantization error)."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file
    src = os.path.join(OUT, "llama-tied")
    cfg = json.load(open(os.path.join(src, "config.json")))
    w = {k: v.float().numpy() for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    # vocabulary: 3 specials, GPT-2's byte symbols for '!'..'~', space (Ġ) and newline (Ċ), 29 merges
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [chr(c) for c in range(33, 127)] + ["\u0120", "\u010a"]
    merges = [f"{b[0]} {b[1]}" for b in GGUF_BIGRAMS]
    tokens += GGUF_BIGRAMS
    assert len(tokens) == VOCAB
    types = [3, 3, 3] + [1] * (VOCAB - 3)
    d = os.path.join(OUT, "llama-gguf")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for fname, qtype in [("model-f32.gguf", None), ("model-q8_0.gguf", gguf.GGMLQuantizationType.Q8_0)]:
        wr = gguf.GGUFWriter(os.path.join(d, fname), "llama")
        wr.add_name("parity llama-tied")
        wr.add_block_count(LAYERS)
        wr.add_context_length(CTX)
        wr.add_embedding_length(HIDDEN)
        wr.add_feed_forward_length(INTER)
        wr.add_head_count(HEADS)
        wr.add_head_count_kv(KV)
        wr.add_rope_freq_base(float(cfg["rope_parameters"]["rope_theta"]))
        wr.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        wr.add_rope_dimension_count(HIDDEN // HEADS)
        wr.add_vocab_size(VOCAB)
        wr.add_tokenizer_model("gpt2")
        wr.add_tokenizer_pre("smollm")
        wr.add_token_list(tokens)
        wr.add_token_types(types)
        wr.add_token_merges(merges)
        wr.add_bos_token_id(1)
        wr.add_eos_token_id(2)
        wr.add_pad_token_id(2)
        wr.add_chat_template(GGUF_TEMPLATE)
        names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
        for i in range(LAYERS):
            for hf, gg in [("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                           ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                           ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn_gate"),
                           ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")]:
                names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
        for hf, gg in names.items():
            t = w[hf]
            if gg.endswith("attn_q.weight"):
                t = llama_cpp_permute(t, HEADS)
            elif gg.endswith("attn_k.weight"):
                t = llama_cpp_permute(t, KV)
            if qtype is not None and t.ndim == 2:
                wr.add_tensor(gg, gguf.quants.quantize(np.ascontiguousarray(t), qtype), raw_dtype=qtype)
            else:
                wr.add_tensor(gg, np.ascontiguousarray(t, dtype=np.float32))
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_tensors_to_file()
        wr.close()
    print(f"llama-gguf: {sorted(os.listdir(d))} (gguf {getattr(gguf, '__version__', '?')})")


GPT2_TEXTS = ["Hello world!", " leading space, trailing  spaces  ", "It's 2024: naïve café — ünïcödé ✓ 🐳",
              "line one\nline two\r\n\ttabbed<|endoftext|>after", "1234567 numbers 3.14159 and CamelCaseWords"]


def gpt2_tokenizer_reference():
    """transformers' GPT-2 fast tokenizer built from the original files: ids of a few texts."""
    from transformers import GPT2Tokenizer
    d = os.path.join(ROOT, "tests", "fixtures", "gpt2")
    with tempfile.TemporaryDirectory() as tmp:
        # the names transformers looks for (vocab.json, merges.txt)
        shutil.copy(os.path.join(d, "encoder.json"), os.path.join(tmp, "vocab.json"))
        shutil.copy(os.path.join(d, "vocab.bpe"), os.path.join(tmp, "merges.txt"))
        tok = GPT2Tokenizer.from_pretrained(tmp)
        cases = [{"text": t, "ids": tok(t)["input_ids"]} for t in GPT2_TEXTS]
    assert cases[0]["ids"] == [15496, 995, 0]
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "cases": cases}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"gpt2 tokenizer: {len(cases)} reference encodings")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--remake-candor", action="store_true", help="retrain candor-lm and redo candor-score")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    make_hf_fixtures()
    make_gguf_fixture()
    gpt2_tokenizer_reference()
    make_candor_checkpoints(args.remake_candor)
    candor_references()
    check_resaved()
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    print(f"fixtures: {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    sys.exit(main())
