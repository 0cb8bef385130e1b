//! Hugging Face interoperability through the real `candor` binary: GGUF import, GPT-2 BPE
//! conversion, `hf:ORG/NAME` from the local cache (offline), candor checkpoints read back by
//! transformers (round trip), and bad checkpoints failing with the file and key named.
//! Fixtures: tests/fixtures/parity (scripts/make_parity_fixtures.py), tests/fixtures/gpt2.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candor_core::rng::Rng;
use candor_data::chat::{ChatTemplate, Message};
use candor_data::Tokenizer;
use candor_model::generate::{generate, SamplingParams};
use candor_model::io::load_frozen;
use candor_model::mask::Layout;
use common::{candor, fails, ok, read_json, repo_root};
use serde_json::Value;

fn parity(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/parity").join(name)
}

fn reference(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn tokenizer_convert_gpt2_files_encodes_hello_world() {
    let tmp = tempfile::tempdir().unwrap();
    let gpt2 = repo_root().join("tests/fixtures/gpt2");
    let out = tmp.path().join("gpt2/tokenizer.json");
    let printed = ok(candor()
        .args(["tokenizer", "convert", "--vocab"])
        .arg(gpt2.join("encoder.json"))
        .arg("--merges")
        .arg(gpt2.join("vocab.bpe"))
        .arg("--out")
        .arg(&out));
    assert!(printed.contains("50257 tokens"), "{printed}");
    let tok = Tokenizer::from_file(&out).unwrap();
    assert_eq!(tok.encode("Hello world!").unwrap(), vec![15496, 995, 0]);
    assert_eq!(tok.eos_id(), Some(50256));
    let e = fails(
        candor()
            .args(["tokenizer", "convert", "--vocab"])
            .arg(gpt2.join("encoder.json"))
            .args(["--merges", "no/such/merges.txt", "--out"])
            .arg(&out),
    );
    assert!(e.contains("no/such/merges.txt: cannot read"), "{e}");
}

/// llama-tied's weights written as llama.cpp writes them (q/k rows permuted): the import
/// must give transformers' logits back, so the un-permutation is right.
#[test]
fn import_gguf_gives_back_the_hugging_face_model() {
    let tmp = tempfile::tempdir().unwrap();
    let r = reference(&parity("llama-tied"));
    let input = r["input_ids"].to_dtype(DType::U32).unwrap();
    let mut worst = vec![];
    for (file, dtype, tol) in [
        ("model-f32.gguf", "f32", 1e-4f32),
        ("model-q8_0.gguf", "f32", 0.1),
        ("model-f32.gguf", "bf16", 0.1),
    ] {
        let out = tmp.path().join(format!("{file}-{dtype}"));
        let printed = ok(candor()
            .args(["import", "--gguf"])
            .arg(parity("llama-gguf").join(file))
            .arg("--out")
            .arg(&out)
            .args(["--dtype", dtype]));
        assert!(printed.contains("2 layers"), "{printed}");
        let model = load_frozen(&out, &Device::Cpu).unwrap();
        let e = max_abs(&model.logits(&input).unwrap(), &r["logits"]);
        println!("import {file} as {dtype}: max abs logit error vs transformers {e:.2e}");
        assert!(e < tol, "{file} {dtype}: {e}");
        worst.push(e);
        let cfg = read_json(&out.join("config.json"));
        assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
        assert_eq!(
            cfg["torch_dtype"],
            if dtype == "f32" {
                "float32"
            } else {
                "bfloat16"
            }
        );
        assert_eq!(cfg["tie_word_embeddings"], true);
        let meta = read_json(&out.join("candor.json"));
        assert_eq!(
            (
                meta["stage"].as_str(),
                meta["head"].as_str(),
                meta["complete"].as_bool()
            ),
            (Some("import"), Some("lm"), Some(true))
        );
    }
    // the F32 file is exact; Q8_0 and bf16 storage only round
    assert!(worst[0] < worst[1] && worst[0] < worst[2]);

    // the tokenizer rebuilt from tokenizer.ggml.*: specials, digit splitting, ChatML template
    let out = tmp.path().join("model-f32.gguf-f32");
    let tok = Tokenizer::from_dir(&out).unwrap();
    let ids = tok.encode("<|im_start|>the 12<|im_end|>").unwrap();
    let pieces: Vec<String> = ids
        .iter()
        .map(|&i| tok.inner.id_to_token(i).unwrap())
        .collect();
    assert_eq!(
        pieces,
        ["<|im_start|>", "th", "e", "\u{120}", "1", "2", "<|im_end|>"]
    );
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (Some(1), Some(2), 2)
    );
    let chat = ChatTemplate::for_tokenizer(&tok)
        .render_prompt("hi")
        .unwrap();
    assert_eq!(
        chat,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );

    let e = fails(
        candor()
            .args(["import", "--gguf"])
            .arg(parity("llama-gguf").join("model-f32.gguf"))
            .arg("--out")
            .arg(&out),
    );
    assert!(
        e.contains("already exists") && e.contains("--overwrite"),
        "{e}"
    );
    let e = fails(
        candor()
            .args(["import", "--gguf"])
            .arg(parity("gpt2").join("config.json"))
            .arg("--out")
            .arg(tmp.path().join("x")),
    );
    assert!(e.contains("gpt2/config.json: not a valid GGUF file"), "{e}");
    assert!(!tmp.path().join("x").exists());
}

/// The candor-trained checkpoints transformers loaded as LlamaForCausalLM /
/// LlamaForSequenceClassification (with AutoTokenizer and the chat template): same token
/// ids, same render, same logits and scores.
#[test]
fn candor_checkpoints_round_trip_through_transformers() {
    for name in ["candor-lm", "candor-score"] {
        let dir = parity(name);
        let r = reference(&dir);
        let meta = read_json(&dir.join("reference.json"));
        let tok = Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(
            tok.encode(meta["text"].as_str().unwrap()).unwrap(),
            ids_of(&r["text_ids"]),
            "{name}: text ids"
        );
        let chat: Vec<Message> = serde_json::from_value(meta["chat"].clone()).unwrap();
        let render = ChatTemplate::for_tokenizer(&tok)
            .render(&chat, false)
            .unwrap();
        assert_eq!(
            render,
            meta["chat_render"].as_str().unwrap(),
            "{name}: chat template"
        );
        assert_eq!(
            tok.encode(&render).unwrap(),
            ids_of(&r["chat_ids"]),
            "{name}: chat ids"
        );
        let model = load_frozen(&dir, &Device::Cpu).unwrap();
        let input = r["input_ids"].to_dtype(DType::U32).unwrap();
        let hidden = model.forward_hidden(&input, None, None, None).unwrap();
        let errors = if name == "candor-lm" {
            let e = max_abs(&model.lm_logits(&hidden).unwrap(), &r["logits"]);
            let gens = meta["generations"].as_array().unwrap();
            let prompts: Vec<Vec<u32>> = gens
                .iter()
                .map(|g| {
                    g["prompt"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap() as u32)
                        .collect()
                })
                .collect();
            let params = SamplingParams {
                max_new_tokens: 20,
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
            };
            let out = generate(
                &model,
                &prompts,
                &params,
                &[],
                tok.pad_id(),
                &mut Rng::new(0),
            )
            .unwrap();
            for (g, s) in gens.iter().zip(&out) {
                let want: Vec<u32> = g["greedy"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect();
                assert_eq!(s.tokens, want, "{name}: greedy");
            }
            vec![e]
        } else {
            let scores = model.scores(&hidden).unwrap();
            let t = input.dim(1).unwrap();
            let pooled = scores.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap();
            // padded batch: transformers with explicit position ids, candor with its layout
            let mask: Vec<Vec<i64>> = r["padded_mask"].to_vec2().unwrap();
            let layout = Layout {
                batch: 2,
                len: t,
                valid: mask.iter().flatten().map(|&m| m == 1).collect(),
                segments: None,
            };
            let dev = Device::Cpu;
            let ph = model
                .forward_hidden(
                    &r["padded_ids"].to_dtype(DType::U32).unwrap(),
                    Some(&layout.positions_tensor(&dev).unwrap()),
                    Some(&layout.bias(&dev).unwrap()),
                    None,
                )
                .unwrap();
            let valid = r["padded_mask"].to_dtype(DType::F32).unwrap();
            let diff = (model.scores(&ph).unwrap() - &r["padded_scores"])
                .unwrap()
                .abs()
                .unwrap();
            let e_pad: f32 = (diff * valid)
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            vec![
                max_abs(&scores, &r["scores"]),
                max_abs(&pooled, &r["pooled"]),
                e_pad,
            ]
        };
        let shown: Vec<String> = errors.iter().map(|e| format!("{e:.2e}")).collect();
        println!(
            "{name}: loads in transformers as {}; max abs errors vs transformers {}",
            meta["architecture"],
            shown.join(", ")
        );
        assert!(errors.iter().all(|&e| e < 1e-4), "{name}: {errors:?}");
    }
}

/// A fake Hugging Face cache (blobs + symlinked snapshot + refs/main, as huggingface_hub
/// lays it out) and HF_HUB_OFFLINE=1: `hf:Org/Tiny` resolves with nothing downloaded.
#[test]
fn hf_names_resolve_in_the_local_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--Org--Tiny");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    let src = parity("candor-lm");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let blob = repo.join("blobs").join(format!("blob-{f}"));
        std::fs::copy(src.join(f), &blob).unwrap();
        std::os::unix::fs::symlink(
            Path::new("../../blobs").join(format!("blob-{f}")),
            snap.join(f),
        )
        .unwrap();
    }
    let gen = |model: &str| {
        ok(candor()
            .env("HF_HOME", home.path())
            .env_remove("HF_HUB_CACHE")
            .env("HF_HUB_OFFLINE", "1")
            .args([
                "generate",
                "--model",
                model,
                "--prompt",
                "Call me",
                "--temperature",
                "0",
                "--max-new-tokens",
                "8",
            ]))
    };
    let from_cache = gen("hf:Org/Tiny");
    assert_eq!(from_cache, gen(src.to_str().unwrap()));
    assert_eq!(from_cache, gen(&format!("hf:Org/Tiny@{rev}")));

    let e = fails(
        candor()
            .env("HF_HOME", home.path())
            .env_remove("HF_HUB_CACHE")
            .env("HF_HUB_OFFLINE", "1")
            .args(["generate", "--model", "hf:Org/Missing", "--prompt", "x"]),
    );
    assert!(
        e.contains("models--Org--Missing: hf:Org/Missing is not in the Hugging Face cache")
            && e.contains("never downloads"),
        "{e}"
    );
    std::fs::remove_file(snap.join("model.safetensors")).unwrap();
    let e = fails(
        candor()
            .env("HF_HOME", home.path())
            .env_remove("HF_HUB_CACHE")
            .args(["generate", "--model", "hf:Org/Tiny", "--prompt", "x"]),
    );
    assert!(
        e.contains(&format!(
            "snapshots/{rev}/model.safetensors: missing: place model.safetensors into"
        )),
        "{e}"
    );
    std::os::unix::fs::symlink(
        "../../blobs/blob-model.safetensors",
        snap.join("model.safetensors"),
    )
    .unwrap();

    // pretrain --init takes the same names
    let corpus = home.path().join("corpus.txt");
    std::fs::write(
        &corpus,
        "Call me Ishmael. Some years ago, never mind how long precisely.\n".repeat(200),
    )
    .unwrap();
    let cfg = home.path().join("pretrain.yaml");
    std::fs::write(
        &cfg,
        format!(
            "init: hf:Org/Tiny\ndata: {{files: [{}]}}\nmodel: {{ctx: 32}}\ntrain: {{steps: 2, batch_size: 2, eval_every: 0, eval_batches: 1, log_every: 1}}\n",
            corpus.display()
        ),
    )
    .unwrap();
    let out = home.path().join("cont");
    ok(candor()
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_CACHE")
        .args(["pretrain", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out));
    let meta = read_json(&out.join("candor.json"));
    assert!(
        meta["parents"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with(&format!("snapshots/{rev}")),
        "{meta}"
    );

    // so do sft --init and eval --model (every stage input resolves the same way)
    let in_home = || {
        let mut c = candor();
        c.env("HF_HOME", home.path())
            .env_remove("HF_HUB_CACHE")
            .env("HF_HUB_OFFLINE", "1");
        c
    };
    let sft_data = home.path().join("sft.jsonl");
    std::fs::write(
        &sft_data,
        "{\"prompt\": \"Call me\", \"response\": \"Ishmael.\"}\n".repeat(40),
    )
    .unwrap();
    let sft_cfg = home.path().join("sft.yaml");
    std::fs::write(
        &sft_cfg,
        format!("data: {{files: [{}], heldout_fraction: 0.1}}\ntrain: {{steps: 2, batch_size: 2, eval_every: 0, log_every: 1}}\n", sft_data.display()),
    )
    .unwrap();
    let sft_out = home.path().join("sft");
    ok(in_home()
        .args([
            "sft",
            "--device",
            "cpu",
            "--init",
            "hf:Org/Tiny",
            "--config",
        ])
        .arg(&sft_cfg)
        .arg("--out")
        .arg(&sft_out));
    let meta = read_json(&sft_out.join("candor.json"));
    assert!(
        meta["parents"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with(&format!("snapshots/{rev}")),
        "{meta}"
    );
    let eval = |model: &str| -> Value {
        serde_json::from_str(&ok(in_home()
            .args([
                "eval", "--json", "--device", "cpu", "--model", model, "--data",
            ])
            .arg(&corpus)))
        .unwrap()
    };
    let (a, b) = (eval("hf:Org/Tiny"), eval(src.to_str().unwrap()));
    assert!(a["eval_loss"].as_f64().unwrap().is_finite());
    assert_eq!(a["eval_loss"], b["eval_loss"]);
}

/// What candor cannot honour fails with the file and the key or tensor named.
#[test]
fn bad_checkpoints_fail_naming_file_and_key_or_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |dir: &Path| {
        fails(
            candor()
                .args(["generate", "--prompt", "x", "--model"])
                .arg(dir),
        )
    };
    let edit_config =
        |name: &str, src: &str, f: &dyn Fn(&mut serde_json::Map<String, Value>)| -> PathBuf {
            let dir = tmp.path().join(name);
            copy_dir(&parity(src), &dir);
            let mut cfg: serde_json::Map<String, Value> =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                    .unwrap();
            f(&mut cfg);
            std::fs::write(
                dir.join("config.json"),
                serde_json::to_string(&cfg).unwrap(),
            )
            .unwrap();
            dir
        };
    let cases: Vec<(PathBuf, &str)> = vec![
        (edit_config("arch", "llama-tied", &|c| {
            c.insert("model_type".into(), "gpt_neox".into());
        }), "config.json: `model_type`: `gpt_neox` is not supported"),
        (edit_config("head", "llama-tied", &|c| {
            c.insert("architectures".into(), serde_json::json!(["LlamaForTokenClassification"]));
        }), "config.json: `architectures`: `LlamaForTokenClassification` is not supported"),
        (edit_config("rope3", "llama-tied", &|c| {
            c.insert("rope_parameters".into(), serde_json::json!({"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}));
        }), "config.json: `rope_parameters`: "),
        (edit_config("rope-linear", "llama-tied", &|c| {
            c.insert("rope_scaling".into(), serde_json::json!({"type": "linear", "factor": 2.0}));
        }), "config.json: `rope_scaling`: "),
        (edit_config("gpt2-scale", "gpt2", &|c| {
            c.insert("scale_attn_by_inverse_layer_idx".into(), true.into());
        }), "config.json: `scale_attn_by_inverse_layer_idx`: true is not implemented"),
        (edit_config("gpt2-act", "gpt2", &|c| {
            c.insert("activation_function".into(), "relu".into());
        }), "config.json: `activation_function`: `relu` is not supported"),
        (edit_config("shape", "llama-tied", &|c| {
            c.insert("intermediate_size".into(), 48.into());
        }), "model.safetensors: tensor `model.layers.0.mlp.down_proj.weight` has shape [32, 64], expected [32, 48]"),
        (edit_config("type", "llama-tied", &|c| {
            c.insert("num_hidden_layers".into(), "two".into());
        }), "config.json: `num_hidden_layers`: invalid type"),
    ];
    for (dir, want) in cases {
        let e = run(&dir);
        assert!(
            e.contains(&format!("{}/", dir.file_name().unwrap().to_str().unwrap()))
                && e.contains(want),
            "want {want:?}, got {e}"
        );
    }
    // a shard the index names is missing
    let dir = tmp.path().join("shards");
    copy_dir(&parity("qwen2-sharded"), &dir);
    std::fs::remove_file(dir.join("model-00003-of-00004.safetensors")).unwrap();
    let e = run(&dir);
    assert!(e.contains("shards/model.safetensors.index.json: names shard `model-00003-of-00004.safetensors`, which is missing"), "{e}");
    // PyTorch pickles only
    let dir = tmp.path().join("pickle");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        parity("llama-tied").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"not read").unwrap();
    let e = run(&dir);
    assert!(
        e.contains("pickle/model.safetensors: missing") || e.contains("pytorch_model.bin"),
        "{e}"
    );
}

/// The real SmolLM2-135M-Instruct, when `scripts/fetch_smollm2.sh` and
/// `scripts/check_smollm2.py` have been run (nothing of it is committed): candor's import
/// answers like transformers on the same dequantized weights.
#[test]
fn smollm2_import_matches_transformers() {
    let dir = repo_root().join(".cache/smollm2/model");
    if !dir.join("reference.safetensors").is_file() {
        println!(
            "skipped: {} has no reference; run `bash scripts/fetch_smollm2.sh`, \
             `candor import --gguf .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out .cache/smollm2/model` \
             and `.venv/bin/python scripts/check_smollm2.py`",
            dir.display()
        );
        return;
    }
    let r = reference(&dir);
    let meta = read_json(&dir.join("reference.json"));
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let render = ChatTemplate::for_tokenizer(&tok)
        .render_prompt("What is the capital of France?")
        .unwrap();
    assert_eq!(render, meta["render"].as_str().unwrap());
    let ids = tok.encode(&render).unwrap();
    assert_eq!(ids, ids_of(&r["input_ids"]));
    let model = load_frozen(&dir, &Device::Cpu).unwrap();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let t = ids.len();
    let logits = model
        .logits(&input)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .narrow(0, t - 8, 8)
        .unwrap();
    let e = max_abs(&logits, &r["logits"]);
    let params = SamplingParams {
        max_new_tokens: 24,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };
    let out = generate(&model, &[ids], &params, &[], tok.pad_id(), &mut Rng::new(0)).unwrap();
    let want: Vec<u32> = meta["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    println!(
        "SmolLM2-135M-Instruct: max abs logit error vs transformers {e:.2e}; reply {:?}",
        tok.decode(&out[0].tokens, false).unwrap()
    );
    assert!(e < 1e-3, "{e}");
    assert_eq!(out[0].tokens, want);
}
