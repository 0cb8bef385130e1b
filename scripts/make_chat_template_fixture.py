#!/usr/bin/env python3
"""Writes tests/fixtures/chat_templates.json: chat templates rendered by transformers.

Run with the reference venv (scripts/setup_venv.sh):

    .venv/bin/python scripts/make_chat_template_fixture.py

Every entry is rendered by `PreTrainedTokenizerFast.apply_chat_template(messages,
tokenize=False, add_generation_prompt=...)` on a tokenizer built locally (a tiny byte-level
BPE trained in this script on a few sentences; nothing comes from the Hugging Face hub),
with `chat_template`, `bos_token` and `eos_token` set to the values below.

Fixture format: a JSON list of
    {"name", "template", "bos_token", "eos_token", "messages", "add_generation_prompt",
     "expected"}
`bos_token` is null where the model's tokenizer has none (Qwen2).

Notes for a Rust (minijinja) renderer checked against this file: transformers compiles
templates in a jinja2 sandbox Environment with trim_blocks=True and lstrip_blocks=True, and
passes the tokenizer's special tokens (bos_token, eos_token, unk_token, pad_token, ...) and
add_generation_prompt as template variables. The templates below contain no newline right
after a block tag, so trim_blocks/lstrip_blocks do not change their output. The Llama-3
template applies `| trim` to each message's content (the filter binds tighter than `+`);
the conversations include content with leading/trailing whitespace to exercise that, and
the ChatML templates keep such whitespace verbatim.

Where the template strings come from (copied verbatim; the hub is not reachable here):
  * chatml_smollm2: `chat_template` of HuggingFaceTB/SmolLM2-135M-Instruct's
    tokenizer_config.json (bos_token "<|im_start|>", eos_token "<|im_end|>"). It inserts
    the default system prompt "You are a helpful AI assistant named SmolLM, trained by
    Hugging Face" when the first message is not a system message.
  * chatml_qwen2: `chat_template` of Qwen/Qwen2-{0.5B,1.5B,7B,72B}-Instruct's
    tokenizer_config.json (bos_token null, eos_token "<|im_end|>"); same shape as SmolLM2's,
    with the default system prompt "You are a helpful assistant.".
  * chatml_plain: the plain ChatML template shown in the transformers chat-templating docs
    ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + ..."), no
    default system prompt.
  * llama3: `chat_template` of meta-llama/Meta-Llama-3-8B-Instruct's tokenizer_config.json
    (the Llama 3.0 one, before 3.1 added the tools/date preamble); bos_token
    "<|begin_of_text|>", eos_token "<|eot_id|>" (the Instruct model's tokenizer_config after
    Meta's update; the base model uses "<|end_of_text|>").
"""
from __future__ import annotations

import json
import pathlib
import sys

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "chat_templates.json"

CHATML_SMOLLM2 = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATML_QWEN2 = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATML_PLAIN = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

TEMPLATES = [
    # name, template, bos_token, eos_token, extra special tokens
    ("chatml_smollm2", CHATML_SMOLLM2, "<|im_start|>", "<|im_end|>", ["<|endoftext|>"]),
    ("chatml_qwen2", CHATML_QWEN2, None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"]),
    ("chatml_plain", CHATML_PLAIN, None, "<|im_end|>", ["<|im_start|>"]),
    (
        "llama3",
        LLAMA3,
        "<|begin_of_text|>",
        "<|eot_id|>",
        ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
    ),
]

CONVERSATIONS = [
    (
        "single_turn",
        [{"role": "user", "content": "What is 2+2?"}],
    ),
    (
        "multi_turn_with_system",
        [
            {"role": "system", "content": "You are a terse math tutor."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "  And 3+3? \n"},
            {"role": "assistant", "content": "6.\nAnything else?"},
        ],
    ),
    (
        "multi_turn_ends_with_user",
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": " Hello! How can I help? "},
            {"role": "user", "content": "Tell me a joke about \"quotes\" & {braces}."},
        ],
    ),
]

TRAIN_TEXT = [
    "What is 2+2? You are a terse math tutor. And 3+3? Anything else?",
    "Hi! Hello! How can I help? Tell me a joke about quotes and braces.",
    "system user assistant",
]


def build_tokenizer(template: str, bos: str | None, eos: str, extra: list[str]) -> PreTrainedTokenizerFast:
    specials = [t for t in [bos, eos, *extra] if t is not None]
    specials = list(dict.fromkeys(specials))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXT, trainer=trainer)
    kwargs = {"eos_token": eos}
    if bos is not None:
        kwargs["bos_token"] = bos
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.chat_template = template
    return fast


def main() -> int:
    entries = []
    for tname, template, bos, eos, extra in TEMPLATES:
        tok = build_tokenizer(template, bos, eos, extra)
        assert tok.bos_token == bos and tok.eos_token == eos, (tok.bos_token, tok.eos_token)
        for cname, messages in CONVERSATIONS:
            for agp in (False, True):
                rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
                assert isinstance(rendered, str)
                entries.append(
                    {
                        "name": f"{tname}/{cname}/{'gen' if agp else 'nogen'}",
                        "template": template,
                        "bos_token": bos,
                        "eos_token": eos,
                        "messages": messages,
                        "add_generation_prompt": agp,
                        "expected": rendered,
                    }
                )

    # Spot checks against hand-written expectations, so a transformers behaviour change
    # (or a typo in a template above) cannot slip into the fixture silently.
    by_name = {e["name"]: e["expected"] for e in entries}
    assert by_name["chatml_plain/single_turn/gen"] == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert by_name["chatml_qwen2/single_turn/nogen"] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    )
    assert by_name["chatml_smollm2/multi_turn_with_system/nogen"].startswith(
        "<|im_start|>system\nYou are a terse math tutor.<|im_end|>\n"
    )
    assert by_name["llama3/single_turn/gen"] == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert "<|end_header_id|>\n\nAnd 3+3?<|eot_id|>" in by_name["llama3/multi_turn_with_system/nogen"]
    assert "<|im_start|>user\n  And 3+3? \n<|im_end|>" in by_name["chatml_plain/multi_turn_with_system/nogen"]

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(entries)} entries to {OUT.relative_to(ROOT)} (transformers {transformers.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
