#!/usr/bin/env python3
"""transformers' reference for the SmolLM2 checkpoint `candor import` made from the GGUF.

    bash scripts/fetch_smollm2.sh && cargo candor import --gguf .cache/smollm2/*.gguf --out .cache/smollm2/model
    .venv/bin/python scripts/check_smollm2.py [DIR]     # DIR defaults to .cache/smollm2/model

Loads DIR in transformers (AutoModelForCausalLM must give LlamaForCausalLM, AutoTokenizer
the imported tokenizer and chat template), renders a chat prompt, and writes
DIR/reference.safetensors (prompt ids, logits of the last 8 positions) and
DIR/reference.json (the render, transformers' 24-token greedy reply). The candor test
`smollm2_import_matches_transformers` (tests/interop.rs) reads them when present.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, ".cache", "smollm2", "model")
    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM", type(model).__name__
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids).logits[0, -8:].float().contiguous()
    out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    reply = out[0, ids.shape[1]:].tolist()
    save_file({"input_ids": ids.contiguous(), "logits": logits}, os.path.join(d, "reference.safetensors"))
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump({"render": text, "greedy": reply, "reply_text": tok.decode(reply)}, f, indent=1)
    print(f"{type(model).__name__}, {type(tok).__name__}: {ids.shape[1]} prompt tokens; greedy reply: {tok.decode(reply)!r}")


if __name__ == "__main__":
    main()
