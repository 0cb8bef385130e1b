//! Parity with transformers: tiny random-weight checkpoints of every architecture candor
//! loads (Llama tied and untied with grouped-query attention, Mistral, Qwen2 with q/k/v
//! biases, GPT-2, a Llama sequence classifier; f32, bf16 and f16 weights; one sharded),
//! written by `scripts/make_parity_fixtures.py` with transformers' logits, log-probs,
//! left-padded logits, scores and 20-token greedy continuations. candor must match them
//! to 1e-4 in f32 (each test prints its worst error) and token for token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candor_core::rng::Rng;
use candor_model::generate::{generate, SamplingParams};
use candor_model::io::{load_frozen, load_trainable, read_config, save_model};
use candor_model::mask::Layout;
use candor_model::ops::token_logprobs;
use candor_model::{Head, Model};
use serde_json::Value;

const TOL: f32 = 1e-4;
const LM_FIXTURES: [&str; 5] = [
    "llama-tied",
    "llama-untied-bf16",
    "mistral-f16",
    "qwen2-sharded",
    "gpt2",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(name)
}

fn reference(dir: &Path) -> (HashMap<String, Tensor>, Value) {
    let tensors =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
        .unwrap();
    (tensors, meta)
}

fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Logits of the left-padded batch at its real positions only, and the layout used.
fn padded(
    model: &Model,
    r: &HashMap<String, Tensor>,
    read: impl Fn(&Tensor) -> Tensor,
) -> (Tensor, Tensor) {
    let mask: Vec<Vec<i64>> = r["padded_mask"].to_vec2().unwrap();
    let (b, t) = (mask.len(), mask[0].len());
    let layout = Layout {
        batch: b,
        len: t,
        valid: mask.iter().flatten().map(|&m| m == 1).collect(),
        segments: None,
    };
    let positions = layout.positions_tensor(&Device::Cpu).unwrap();
    assert_eq!(
        positions
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec2::<i64>()
            .unwrap(),
        r["padded_positions"].to_vec2::<i64>().unwrap()
    );
    let hidden = model
        .forward_hidden(
            &ids(&r["padded_ids"]),
            Some(&positions),
            Some(&layout.bias(&Device::Cpu).unwrap()),
            None,
        )
        .unwrap();
    let valid = r["padded_mask"].to_dtype(DType::F32).unwrap();
    (read(&hidden), valid)
}

fn masked_err(got: &Tensor, want: &Tensor, valid: &Tensor) -> f32 {
    let diff = (got - want).unwrap().abs().unwrap();
    let valid = if diff.rank() == 3 {
        valid.unsqueeze(2).unwrap()
    } else {
        valid.clone()
    };
    diff.broadcast_mul(&valid)
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn lm_logits_logprobs_and_padded_logits_match_transformers() {
    let mut worst = 0f32;
    for name in LM_FIXTURES {
        let dir = fixture(name);
        let (r, meta) = reference(&dir);
        let model = load_frozen(&dir, &Device::Cpu).unwrap();
        let input = ids(&r["input_ids"]);
        let logits = model.logits(&input).unwrap();
        let e_logits = max_abs(&logits, &r["logits"]);
        let t = input.dim(1).unwrap();
        let lp = token_logprobs(
            &logits.narrow(1, 0, t - 1).unwrap(),
            &input.narrow(1, 1, t - 1).unwrap(),
        )
        .unwrap();
        let e_lp = max_abs(&lp, &r["logprobs"]);
        let (pl, valid) = padded(&model, &r, |h| model.lm_logits(h).unwrap());
        let e_pad = masked_err(&pl, &r["padded_logits"], &valid);
        println!(
            "{name:>18} ({}, {} weights): max abs error logits {e_logits:.2e}, log-probs {e_lp:.2e}, left-padded logits {e_pad:.2e}",
            meta["architecture"].as_str().unwrap(),
            meta["stored_dtype"].as_str().unwrap()
        );
        for e in [e_logits, e_lp, e_pad] {
            assert!(e < TOL, "{name}: error {e} >= {TOL}");
            worst = worst.max(e);
        }
    }
    println!("worst max abs error over all lm fixtures: {worst:.2e}");
}

#[test]
fn greedy_generation_matches_transformers_token_for_token() {
    for name in LM_FIXTURES {
        let dir = fixture(name);
        let (_, meta) = reference(&dir);
        let model = load_frozen(&dir, &Device::Cpu).unwrap();
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
        // both prompts in one left-padded batch, through the KV cache
        let params = SamplingParams {
            max_new_tokens: 20,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        };
        let out = generate(&model, &prompts, &params, &[], 0, &mut Rng::new(0)).unwrap();
        for (g, s) in gens.iter().zip(&out) {
            let want: Vec<u32> = g["greedy"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(s.tokens, want, "{name}: greedy continuation differs");
        }
        println!(
            "{name:>18}: 2 × 20 greedy tokens identical (smallest top-2 logit gap {:.4})",
            meta["min_top2_gap"]
        );
    }
}

#[test]
fn score_head_matches_llama_for_sequence_classification() {
    let dir = fixture("llama-score");
    let (r, _) = reference(&dir);
    let model = load_frozen(&dir, &Device::Cpu).unwrap();
    assert_eq!(model.head, Head::Score);
    let input = ids(&r["input_ids"]);
    let scores = model
        .scores(&model.forward_hidden(&input, None, None, None).unwrap())
        .unwrap(); // (B, T)
    let e_scores = max_abs(&scores, &r["scores"]);
    // transformers pools at the last non-pad token; these rows hold no pad id, so: the last
    let t = input.dim(1).unwrap();
    let e_pooled = max_abs(
        &scores.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap(),
        &r["pooled"],
    );
    let (ps, valid) = padded(&model, &r, |h| model.scores(h).unwrap());
    let e_pad = masked_err(&ps, &r["padded_scores"], &valid);
    println!("llama-score: max abs error per-position scores {e_scores:.2e}, pooled score {e_pooled:.2e}, left-padded {e_pad:.2e}");
    for e in [e_scores, e_pooled, e_pad] {
        assert!(e < TOL, "score error {e}");
    }
}

#[test]
fn trainable_load_matches_and_every_gpt2_parameter_gets_a_gradient() {
    let dir = fixture("gpt2");
    let (r, _) = reference(&dir);
    let (model, varmap) = load_trainable(&dir, Head::Lm, &mut Rng::new(0), &Device::Cpu).unwrap();
    let input = ids(&r["input_ids"]);
    let logits = model.logits(&input).unwrap();
    assert!(max_abs(&logits, &r["logits"]) < TOL);
    let t = input.dim(1).unwrap();
    let lp = token_logprobs(
        &logits.narrow(1, 0, t - 1).unwrap(),
        &input.narrow(1, 1, t - 1).unwrap(),
    )
    .unwrap();
    let grads = lp.mean_all().unwrap().neg().unwrap().backward().unwrap();
    let vars = varmap.data().lock().unwrap();
    assert_eq!(
        vars.len(),
        4 + 2 * 12,
        "wte, wpe, ln_f.{{weight,bias}} + 12 per block"
    );
    for (name, var) in vars.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0, "{name}: zero gradient");
    }
}

/// GPT-2 checkpoints come with and without the `transformer.` prefix (the original files
/// have none, and carry `attn.bias` mask buffers); candor reads both, and writes config.json
/// in GPT-2's own keys so `GPT2LMHeadModel` reads it (the script checks that side).
#[test]
fn gpt2_original_names_load_and_candor_writes_gpt2_keys() {
    let dir = fixture("gpt2");
    let (r, _) = reference(&dir);
    let tmp = tempfile::tempdir().unwrap();
    let w = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut renamed: HashMap<String, Tensor> = w
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("transformer.").unwrap_or(&k).to_string(), v))
        .collect();
    renamed.insert(
        "h.0.attn.bias".into(),
        Tensor::ones((1, 1, 64, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&renamed, tmp.path().join("model.safetensors")).unwrap();
    std::fs::copy(dir.join("config.json"), tmp.path().join("config.json")).unwrap();
    let model = load_frozen(tmp.path(), &Device::Cpu).unwrap();
    let e = max_abs(&model.logits(&ids(&r["input_ids"])).unwrap(), &r["logits"]);
    assert!(e < TOL, "unprefixed GPT-2 names: {e}");

    let (model, varmap) =
        load_trainable(tmp.path(), Head::Lm, &mut Rng::new(0), &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_model(out.path(), &model.config, Head::Lm, &varmap).unwrap();
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["architectures"][0], "GPT2LMHeadModel");
    assert_eq!(
        (
            cfg["n_embd"].as_u64(),
            cfg["n_layer"].as_u64(),
            cfg["n_head"].as_u64()
        ),
        (Some(32), Some(2), Some(4))
    );
    assert_eq!(
        (cfg["n_positions"].as_u64(), cfg["n_inner"].as_u64()),
        (Some(64), Some(128))
    );
    assert!(
        cfg.get("hidden_size").is_none() && cfg.get("rope_theta").is_none(),
        "{cfg}"
    );
    let names =
        candle_core::safetensors::load(out.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(
        names.contains_key("transformer.h.1.attn.c_attn.weight")
            && !names.contains_key("lm_head.weight")
    );
    let again = load_frozen(out.path(), &Device::Cpu).unwrap();
    assert!(max_abs(&again.logits(&ids(&r["input_ids"])).unwrap(), &r["logits"]) < TOL);
}

#[test]
fn transformers_5_config_keys_are_read() {
    // rope_parameters (transformers >= 5) carries rope_theta; dtype replaces torch_dtype
    let cfg = read_config(&fixture("llama-untied-bf16")).unwrap();
    assert_eq!(cfg.rope_theta, 500000.0);
    assert_eq!(cfg.torch_dtype, "bfloat16");
    assert!(!cfg.tie_word_embeddings);
    let cfg = read_config(&fixture("qwen2-sharded")).unwrap();
    assert!(cfg.qkv_bias() && !cfg.o_bias() && cfg.rope_theta == 1e6);
    let logits = load_frozen(&fixture("qwen2-sharded"), &Device::Cpu).unwrap();
    assert_eq!(logits.config.vocab_size, 128);
    let _ = D::Minus1;
}
