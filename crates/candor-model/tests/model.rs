//! Model tests: gradients reach every parameter, agree with finite differences (f64, the
//! composed ops) and, through the fused CPU kernels (f32), with the f64 gradients; the KV
//! cache and the full forward agree; weights round-trip through the checkpoint format.
//! Llama-style and GPT-2 configs, LM and score heads.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candor_core::rng::Rng;
use candor_model::config::Arch;
use candor_model::generate::{generate, SamplingParams};
use candor_model::io::{build_trainable, load_frozen, load_trainable, read_weights, save_model};
use candor_model::mask::Layout;
use candor_model::ops::token_logprobs;
use candor_model::{Head, Model, ModelConfig};

fn tiny_config(tied: bool, bias: bool) -> ModelConfig {
    let mut c = ModelConfig::llama(37, 16, 2, 4, 2, 24, 32, 10000.0, tied);
    c.attention_bias = bias;
    c
}

/// GPT-2's switches on the same sizes: LayerNorm, learned positions, Conv1D, GELU.
fn tiny_gpt2() -> ModelConfig {
    let mut c = ModelConfig::llama(37, 16, 2, 4, 4, 24, 32, 10000.0, true);
    c.model_type = "gpt2".into();
    c.architectures = vec!["GPT2LMHeadModel".into()];
    c.hidden_act = "gelu_new".into();
    c
}

/// The (config, head) pairs the gradient tests cover.
fn configs() -> Vec<(ModelConfig, Head)> {
    vec![
        (tiny_config(true, false), Head::Lm),
        (tiny_config(false, true), Head::Lm),
        (tiny_config(true, true), Head::Score),
        (tiny_gpt2(), Head::Lm),
        (tiny_gpt2(), Head::Score),
    ]
}

fn ids(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    Tensor::from_vec(rows.concat(), (rows.len(), t), &Device::Cpu).unwrap()
}

/// Mean next-token cross-entropy over real tokens of a left-padded batch, plus the score
/// head's read-out when there is one: a loss that touches every parameter.
fn loss(model: &Model, input: &Tensor, layout: &Layout) -> Tensor {
    let dev = Device::Cpu;
    let hidden = model
        .forward_hidden(
            input,
            Some(&layout.positions_tensor(&dev).unwrap()),
            Some(&layout.bias(&dev).unwrap()),
            None,
        )
        .unwrap();
    match model.head {
        Head::Lm => {
            let t = input.dim(1).unwrap();
            let logits = model
                .lm_logits(&hidden.narrow(1, 0, t - 1).unwrap())
                .unwrap();
            let lp = token_logprobs(&logits, &input.narrow(1, 1, t - 1).unwrap()).unwrap();
            // only predictions from a real token (padding queries see no keys at all; their
            // outputs are never used, as in training)
            let w: Vec<f32> = (0..layout.batch)
                .flat_map(|b| (0..t - 1).map(move |i| (b, i)))
                .map(|(b, i)| if layout.valid[b * t + i] { 1.0 } else { 0.0 })
                .collect();
            let w = Tensor::from_vec(w, (layout.batch, t - 1), &dev)
                .unwrap()
                .to_dtype(lp.dtype())
                .unwrap();
            ((lp * &w).unwrap().sum_all().unwrap()
                / w.sum_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap())
            .unwrap()
            .neg()
            .unwrap()
        }
        Head::Score => {
            // the last token's score, as a reward model reads it
            let t = input.dim(1).unwrap();
            let s = model.scores(&hidden).unwrap().narrow(1, t - 1, 1).unwrap();
            s.sqr().unwrap().mean_all().unwrap()
        }
    }
}

fn padded_batch() -> (Tensor, Layout) {
    let input = ids(&[&[0, 0, 5, 9, 12, 3, 7], &[1, 2, 3, 4, 5, 6, 36]]);
    let mut valid = vec![true; 14];
    valid[0] = false;
    valid[1] = false;
    (
        input,
        Layout {
            batch: 2,
            len: 7,
            valid,
            segments: None,
        },
    )
}

#[test]
fn every_trainable_parameter_gets_a_nonzero_gradient() {
    for (cfg, head) in configs() {
        let (tied, bias, arch) = (cfg.tie_word_embeddings, cfg.attention_bias, cfg.arch());
        let (model, varmap) =
            build_trainable(&cfg, head, None, &[], &mut Rng::new(1), &Device::Cpu).unwrap();
        let (input, layout) = padded_batch();
        let grads = loss(&model, &input, &layout).backward().unwrap();
        let vars = varmap.data().lock().unwrap();
        assert_eq!(vars.len(), model_var_count(&cfg, head));
        for (name, var) in vars.iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let norm: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(
                norm > 0.0,
                "{name}: zero gradient ({arch:?}, tied={tied}, bias={bias}, {head})"
            );
        }
    }
}

fn model_var_count(cfg: &ModelConfig, head: Head) -> usize {
    let head_vars = match head {
        Head::Lm if cfg.tie_word_embeddings => 0,
        _ => 1,
    };
    match cfg.arch() {
        // embed; per layer q, k, v, o, gate, up, down, 2 norms (+ 4 attention biases); final norm
        Arch::Llama => {
            1 + cfg.num_hidden_layers * (4 + 3 + 2 + if cfg.attention_bias { 4 } else { 0 })
                + 1
                + head_vars
        }
        // wte, wpe; per layer c_attn, c_proj, c_fc, mlp c_proj, ln_1, ln_2 (weight and bias
        // each); ln_f weight and bias
        Arch::Gpt2 => 2 + cfg.num_hidden_layers * 12 + 2 + head_vars,
    }
}

/// A model in `dtype` with random weights that do not depend on the dtype (each tensor from
/// its own seeded stream; norm weights 1 + noise, since norms at 1 and biases at 0 would
/// leave some gradients zero by symmetry). Variables sorted by name.
fn perturbed(cfg: &ModelConfig, head: Head, dtype: DType) -> (Model, Vec<(String, Var)>) {
    let varmap = VarMap::new();
    let model = Model::new(
        cfg,
        head,
        VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu),
    )
    .unwrap();
    let mut vars: Vec<_> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in &vars {
        let mut rng = Rng::derive(5, name);
        let norm =
            name.ends_with("norm.weight") || (name.contains(".ln_") && name.ends_with(".weight"));
        let v: Vec<f64> = (0..var.elem_count())
            .map(|_| rng.normal() * 0.3 + if norm { 1.0 } else { 0.0 })
            .collect();
        var.set(
            &Tensor::from_vec(v, var.shape(), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
    }
    (model, vars)
}

#[test]
fn gradients_match_finite_differences_in_f64() {
    for (cfg, head) in configs() {
        let what = format!(
            "{:?} {head} tied={} bias={}",
            cfg.arch(),
            cfg.tie_word_embeddings,
            cfg.attention_bias
        );
        let (model, vars) = perturbed(&cfg, head, DType::F64);
        let (input, layout) = padded_batch();
        let f = || -> f64 { loss(&model, &input, &layout).to_scalar::<f64>().unwrap() };
        let grads = loss(&model, &input, &layout).backward().unwrap();
        let mut worst = 0.0f64;
        for (name, var) in &vars {
            let g: Vec<f64> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            // three elements per parameter tensor, the largest-gradient one among them
            let mut picks = vec![0, base.len() / 2, base.len() - 1];
            picks.push(
                (0..g.len())
                    .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                    .unwrap(),
            );
            for i in picks {
                let eps = 1e-5;
                let mut plus = base.clone();
                plus[i] += eps;
                var.set(&Tensor::from_vec(plus, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let lp = f();
                let mut minus = base.clone();
                minus[i] -= eps;
                var.set(&Tensor::from_vec(minus, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let lm = f();
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let numeric = (lp - lm) / (2.0 * eps);
                let denom = numeric.abs().max(g[i].abs()).max(1e-6);
                let rel = (numeric - g[i]).abs() / denom;
                worst = worst.max(rel);
                assert!(
                    rel < 1e-4,
                    "{what} {name}[{i}]: analytic {} vs numeric {numeric} (rel {rel:.2e})",
                    g[i]
                );
            }
        }
        println!("{what}: worst relative error vs finite differences {worst:.2e}");
    }
}

/// f32 on the CPU runs the fused kernels (linear, RMSNorm, RoPE, attention under the padding
/// bias, SwiGLU); f64 the composed ops that the finite-difference test above checks. Same
/// weights, same batch: the loss and every parameter's gradient agree to f32 precision
/// (error relative to the tensor's largest gradient element).
#[test]
fn f32_fused_gradients_match_f64_composed_gradients() {
    let (input, layout) = padded_batch();
    for (cfg, head) in configs() {
        let what = format!(
            "{:?} {head} tied={} bias={}",
            cfg.arch(),
            cfg.tie_word_embeddings,
            cfg.attention_bias
        );
        let (m64, v64) = perturbed(&cfg, head, DType::F64);
        let (m32, v32) = perturbed(&cfg, head, DType::F32);
        let (l64, l32) = (loss(&m64, &input, &layout), loss(&m32, &input, &layout));
        let (a, b) = (
            l64.to_scalar::<f64>().unwrap(),
            l32.to_scalar::<f32>().unwrap() as f64,
        );
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "{what}: loss f64 {a} vs f32 {b}"
        );
        let (g64, g32) = (l64.backward().unwrap(), l32.backward().unwrap());
        let mut worst = 0.0f64;
        for ((name, x64), (_, x32)) in v64.iter().zip(&v32) {
            let want: Vec<f64> = g64
                .get(x64.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got = g32
                .get(x32.as_tensor())
                .unwrap_or_else(|| panic!("{what} {name}: no f32 gradient"));
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            let scale = want.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
            let err = want
                .iter()
                .zip(&got)
                .fold(0f64, |m, (w, &g)| m.max((w - g as f64).abs()))
                / scale;
            assert!(
                err < 1e-4,
                "{what} {name}: f32 gradient off by {err:.2e} of its largest element"
            );
            worst = worst.max(err);
        }
        println!(
            "{what}: worst f32 (fused: {}) vs f64 gradient error {worst:.2e}",
            candor_model::fused::enabled(&m32.forward_hidden(&input, None, None, None).unwrap())
        );
    }
}

#[test]
fn kv_cache_matches_full_forward() {
    for cfg in [tiny_config(true, false), tiny_gpt2()] {
        let (model, _) =
            build_trainable(&cfg, Head::Lm, None, &[], &mut Rng::new(2), &Device::Cpu).unwrap();
        let input = ids(&[&[3, 1, 4, 1, 5, 9, 2, 6]]);
        let full: Vec<Vec<f32>> = model
            .logits(&input)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let mut cache = model.new_cache();
        let mut inc = vec![];
        // prefill 3 tokens, then one at a time
        let h = model
            .forward_hidden(
                &input.narrow(1, 0, 3).unwrap(),
                None,
                None,
                Some(&mut cache),
            )
            .unwrap();
        inc.extend(
            model
                .lm_logits(&h)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
        );
        for t in 3..8 {
            let h = model
                .forward_hidden(
                    &input.narrow(1, t, 1).unwrap(),
                    None,
                    None,
                    Some(&mut cache),
                )
                .unwrap();
            inc.extend(
                model
                    .lm_logits(&h)
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap(),
            );
        }
        let worst = full
            .iter()
            .flatten()
            .zip(inc.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(worst < 1e-5, "{:?}: max abs diff {worst}", cfg.arch());
    }
}

#[test]
fn sampled_logprobs_equal_full_forward_recompute() {
    let cfg = tiny_config(true, false);
    let (model, _) =
        build_trainable(&cfg, Head::Lm, None, &[], &mut Rng::new(3), &Device::Cpu).unwrap();
    let prompts = vec![vec![3, 4, 5], vec![7], vec![1, 2, 3, 4, 5, 6]];
    let params = SamplingParams {
        max_new_tokens: 9,
        temperature: 0.7,
        top_k: 10,
        top_p: 0.95,
    };
    let samples = generate(&model, &prompts, &params, &[36], 0, &mut Rng::new(9)).unwrap();
    for (p, s) in prompts.iter().zip(&samples) {
        let seq: Vec<u32> = p.iter().chain(&s.tokens).copied().collect();
        let input = Tensor::from_vec(seq.clone(), (1, seq.len()), &Device::Cpu).unwrap();
        let logits = (model.logits(&input).unwrap() / params.temperature).unwrap();
        let n = s.tokens.len();
        let lp: Vec<f32> = token_logprobs(
            &logits.narrow(1, p.len() - 1, n).unwrap(),
            &input.narrow(1, p.len(), n).unwrap(),
        )
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
        for (a, b) in lp.iter().zip(&s.logprobs) {
            assert!((a - b).abs() < 1e-4, "recomputed {a} vs sampled {b}");
        }
    }
    // same seed, same samples
    let again = generate(&model, &prompts, &params, &[36], 0, &mut Rng::new(9)).unwrap();
    assert_eq!(samples, again);
}

#[test]
fn checkpoint_weights_round_trip_and_new_heads_initialise() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(false, false);
    let (model, varmap) =
        build_trainable(&cfg, Head::Lm, None, &[], &mut Rng::new(4), &Device::Cpu).unwrap();
    save_model(dir.path(), &cfg, Head::Lm, &varmap).unwrap();
    let input = ids(&[&[1, 2, 3, 4]]);
    let want: Vec<f32> = model
        .logits(&input)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let frozen = load_frozen(dir.path(), &Device::Cpu).unwrap();
    let got: Vec<f32> = frozen
        .logits(&input)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(want, got);
    // a reward model from the lm checkpoint: backbone loaded, score head new
    let (rm, _) = load_trainable(dir.path(), Head::Score, &mut Rng::new(0), &Device::Cpu).unwrap();
    let h1 = model.forward_hidden(&input, None, None, None).unwrap();
    let h2 = rm.forward_hidden(&input, None, None, None).unwrap();
    assert_eq!(
        h1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        h2.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    assert_eq!(rm.scores(&h2).unwrap().dims(), &[1, 4]);
}

/// Loading reads each tensor from its file straight into the model's own buffer: trainable
/// variables and frozen weights equal what candle's safetensors reader gives, bit for bit,
/// from an f32 file and from a bf16 one (converted to f32 exactly as `to_dtype` does), and
/// a model loaded as bf16 holds those f32 values cast once.
#[test]
fn loaded_weights_equal_the_file_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(false, true);
    let (_, varmap) =
        build_trainable(&cfg, Head::Lm, None, &[], &mut Rng::new(4), &Device::Cpu).unwrap();
    let bits = |t: &Tensor| -> Vec<u32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    for file_dtype in [DType::F32, DType::BF16] {
        save_model(dir.path(), &cfg, Head::Lm, &varmap).unwrap();
        let st = dir.path().join("model.safetensors");
        if file_dtype == DType::BF16 {
            let t = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
            let t: HashMap<String, Tensor> = t
                .into_iter()
                .map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap()))
                .collect();
            candle_core::safetensors::save(&t, &st).unwrap();
        }
        let file = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
        assert!(file.values().all(|t| t.dtype() == file_dtype));
        let (_, vars) =
            load_trainable(dir.path(), Head::Lm, &mut Rng::new(0), &Device::Cpu).unwrap();
        let vars = vars.data().lock().unwrap();
        assert_eq!(vars.len(), file.len());
        for (name, t) in &file {
            let v = &vars[name];
            assert!(v.as_tensor().is_variable() && v.dtype() == DType::F32);
            assert_eq!(bits(v.as_tensor()), bits(t), "{name} ({file_dtype:?} file)");
        }
        // frozen, f32 and bf16: the same values as the variables, cast once
        let input = ids(&[&[1, 2, 3, 4]]);
        let frozen = load_frozen(dir.path(), &Device::Cpu).unwrap();
        let (trainable, _) =
            load_trainable(dir.path(), Head::Lm, &mut Rng::new(0), &Device::Cpu).unwrap();
        assert_eq!(
            bits(&frozen.logits(&input).unwrap()),
            bits(&trainable.logits(&input).unwrap())
        );
        let half = candor_model::io::load_frozen_as(dir.path(), DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(half.dtype(), DType::BF16);
        let cast: HashMap<String, Tensor> = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().to_dtype(DType::BF16).unwrap()))
            .collect();
        let want = Model::new(
            &cfg,
            Head::Lm,
            VarBuilder::from_tensors(cast, DType::BF16, &Device::Cpu),
        )
        .unwrap();
        assert_eq!(
            bits(&half.logits(&input).unwrap()),
            bits(&want.logits(&input).unwrap())
        );
    }
}

#[test]
fn bad_weights_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(true, false);
    let (_, varmap) =
        build_trainable(&cfg, Head::Lm, None, &[], &mut Rng::new(4), &Device::Cpu).unwrap();
    save_model(dir.path(), &cfg, Head::Lm, &varmap).unwrap();
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();

    // the one-line errors of loading the model, and of reading its weights alone
    let load_err = || {
        load_frozen(dir.path(), &Device::Cpu)
            .err()
            .unwrap()
            .to_string()
    };
    let read_err = || {
        read_weights(dir.path(), &Device::Cpu)
            .err()
            .unwrap()
            .to_string()
    };

    // truncated file
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err();
    assert!(
        e.contains("model.safetensors: not a valid safetensors file"),
        "{e}"
    );

    // wrong shape: a config with a wider MLP than the weights
    std::fs::write(&st, &bytes).unwrap();
    let mut wide = cfg.clone();
    wide.intermediate_size = 32;
    wide.write(&dir.path().join("config.json")).unwrap();
    let e = load_err();
    assert!(e.contains("model.safetensors: tensor `model.layers.0.mlp.down_proj.weight` has shape [16, 24], expected [16, 32]"), "{e}");

    // missing tensor: an untied config needs lm_head.weight
    let mut untied = cfg.clone();
    untied.tie_word_embeddings = false;
    untied.write(&dir.path().join("config.json")).unwrap();
    let e = load_err();
    assert!(e.contains("missing tensor(s) `lm_head.weight`"), "{e}");

    // unexpected tensor: fewer layers in the config than in the file
    let mut shallow = cfg.clone();
    shallow.num_hidden_layers = 1;
    shallow.write(&dir.path().join("config.json")).unwrap();
    let e = load_err();
    assert!(e.contains("unexpected tensor `model.layers.1."), "{e}");

    // an integer tensor where weights should be
    let ids = Tensor::new(&[1i64, 2], &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("model.norm.weight", ids)]), &st).unwrap();
    let e = read_err();
    assert!(
        e.contains("tensor `model.norm.weight` has dtype I64, expected a float type"),
        "{e}"
    );

    // data past what the header describes
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0u8; 4]);
    std::fs::write(&st, &longer).unwrap();
    let e = read_err();
    assert!(e.contains("bytes of data, the file holds"), "{e}");

    // no weights at all
    std::fs::remove_file(&st).unwrap();
    let e = read_err();
    assert!(e.contains("no model.safetensors"), "{e}");
    let _unused: HashMap<String, Tensor> = HashMap::new();
}
