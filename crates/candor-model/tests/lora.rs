//! LoRA: adapters PEFT wrote load with PEFT's outputs (tests/fixtures/lora, made by
//! scripts/peft_fixture.py); an adapter candor trained gives the outputs PEFT computed for
//! it; every adapter parameter gets a gradient, equal to finite differences; the base is
//! frozen and shared with the adapters-off model; bad adapter directories fail with one line
//! naming the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candor_core::rng::Rng;
use candor_model::io::{load_frozen, read_config};
use candor_model::lora::{self, LoraConfig};
use candor_model::{Head, Model, ModelConfig};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn reference(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn ids(r: &HashMap<String, Tensor>) -> Tensor {
    r["input_ids"].to_dtype(DType::U32).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn peft_adapters_load_with_peft_logits() {
    for name in ["lora/peft-llama", "lora/peft-gpt2", "lora/candor-sft"] {
        let dir = fixture(name);
        if name.ends_with("candor-sft") && !dir.exists() {
            continue;
        }
        let r = reference(&dir);
        let model = load_frozen(&dir, &Device::Cpu).unwrap();
        let logits = model.logits(&ids(&r)).unwrap();
        let err = max_abs(&logits, &r["logits"]);
        // and the adapters make a difference: the base alone is far off
        let base = load_frozen(&lora::base_dir(&dir).unwrap(), &Device::Cpu).unwrap();
        let base_err = max_abs(&base.logits(&ids(&r)).unwrap(), &r["logits"]);
        println!("{name}: max abs error vs PEFT {err:.2e} (base alone {base_err:.2e})");
        assert!(err < 1e-4, "{name}: logits off by {err}");
        assert!(base_err > 1e-2, "{name}: the adapter changes nothing");
    }
}

/// A sequence classifier's adapter PEFT wrote (rsLoRA, a new score head), and the reward
/// model's adapter candor trained (scores PEFT computed for it).
#[test]
fn sequence_classification_adapters_load_as_score_models() {
    for name in ["lora/peft-llama-score", "lora/candor-reward"] {
        let dir = fixture(name);
        let r = reference(&dir);
        assert_eq!(read_config(&dir).unwrap().head(), Head::Score);
        let model = load_frozen(&dir, &Device::Cpu).unwrap();
        assert_eq!(model.head, Head::Score);
        let hidden = model.forward_hidden(&ids(&r), None, None, None).unwrap();
        let err = max_abs(&model.scores(&hidden).unwrap(), &r["scores"]);
        println!("{name}: max abs score error vs PEFT {err:.2e}");
        assert!(err < 1e-4, "{name}: scores off by {err}");
    }
}

/// Training a loaded adapter further starts from exactly PEFT's outputs (the live
/// adapter path, not the merged weights).
#[test]
fn trainable_adapters_from_a_peft_directory_give_peft_logits() {
    let cases = [
        ("lora/peft-llama", 4, 12.0, "all-linear", 2 * 7 * 2),
        ("lora/peft-gpt2", 2, 3.0, "all-linear", 2 * 4 * 2),
    ];
    for (name, rank, alpha, targets, n_vars) in cases {
        let dir = fixture(name);
        let r = reference(&dir);
        let cfg = LoraConfig {
            rank,
            alpha,
            target_modules: vec![targets.into()],
            ..Default::default()
        };
        let (model, adapters) = lora::load_trainable(
            &lora::base_dir(&dir).unwrap(),
            "base".into(),
            Head::Lm,
            &cfg,
            Some(&dir),
            DType::F32,
            &mut Rng::new(0),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(adapters.varmap.all_vars().len(), n_vars, "{name}");
        let err = max_abs(&model.logits(&ids(&r)).unwrap(), &r["logits"]);
        assert!(err < 1e-4, "{name}: logits off by {err}");
    }
}

fn tiny(arch_gpt2: bool) -> ModelConfig {
    let mut c = ModelConfig::llama(37, 16, 2, 4, 2, 24, 32, 10000.0, true);
    if arch_gpt2 {
        c.model_type = "gpt2".into();
        c.architectures = vec!["GPT2LMHeadModel".into()];
        c.hidden_act = "gelu_new".into();
        c.num_key_value_heads = Some(4);
    }
    c
}

/// A frozen base in `dtype` (plain tensors, random) with adapters on every projection
/// (B random too, so every adapter parameter matters), and the adapters' variables.
fn adapted(cfg: &ModelConfig, head: Head, dtype: DType) -> (Model, Vec<(String, Var)>) {
    let varmap = VarMap::new();
    Model::new(
        cfg,
        head,
        VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu),
    )
    .unwrap();
    let mut tensors = HashMap::new();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let mut rng = Rng::derive(3, name);
        let norm = name.contains("norm") || name.contains(".ln_");
        let v: Vec<f64> = (0..var.elem_count())
            .map(|_| rng.normal() * 0.3 + if norm { 1.0 } else { 0.0 })
            .collect();
        let t = Tensor::from_vec(v, var.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        tensors.insert(name.clone(), t);
    }
    let mut model = Model::new(
        cfg,
        head,
        VarBuilder::from_tensors(tensors, dtype, &Device::Cpu),
    )
    .unwrap();
    let lcfg = LoraConfig {
        rank: 3,
        alpha: 5.0,
        target_modules: vec!["all-linear".into()],
        ..Default::default()
    };
    let adapters = VarMap::new();
    lora::attach(&mut model, &lcfg, &adapters, None, &mut Rng::new(9)).unwrap();
    let mut vars: Vec<(String, Var)> = adapters
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in &vars {
        if name.contains("lora_B") {
            let mut rng = Rng::derive(4, name);
            let v: Vec<f64> = (0..var.elem_count()).map(|_| rng.normal() * 0.3).collect();
            var.set(
                &Tensor::from_vec(v, var.shape(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(var.dtype())
                    .unwrap(),
            )
            .unwrap();
        }
    }
    (model, vars)
}

fn batch() -> Tensor {
    Tensor::from_vec(
        vec![0u32, 5, 9, 12, 3, 7, 1, 2, 3, 4, 5, 36],
        (2, 6),
        &Device::Cpu,
    )
    .unwrap()
}

/// Mean log-likelihood of the batch's next tokens, or the mean squared last score.
fn loss(model: &Model) -> Tensor {
    let input = batch();
    let hidden = model.forward_hidden(&input, None, None, None).unwrap();
    match model.head {
        Head::Lm => {
            let logits = model.lm_logits(&hidden.narrow(1, 0, 5).unwrap()).unwrap();
            candor_model::ops::token_logprobs(&logits, &input.narrow(1, 1, 5).unwrap())
                .unwrap()
                .mean_all()
                .unwrap()
        }
        Head::Score => model
            .scores(&hidden)
            .unwrap()
            .narrow(1, 5, 1)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap(),
    }
}

fn cases() -> Vec<(ModelConfig, Head)> {
    vec![
        (tiny(false), Head::Lm),
        (tiny(false), Head::Score),
        (tiny(true), Head::Lm),
    ]
}

#[test]
fn every_adapter_parameter_gets_a_nonzero_gradient_and_the_base_none() {
    for (cfg, head) in cases() {
        // f32: the base runs the fused CPU kernels, the adapters the composed ops
        let (model, vars) = adapted(&cfg, head, DType::F32);
        let per_layer = if cfg.model_type == "gpt2" { 4 } else { 7 };
        assert_eq!(vars.len(), 2 * per_layer * cfg.num_hidden_layers);
        let grads = loss(&model).backward().unwrap();
        for (name, var) in &vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let norm: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(norm > 0.0, "{name}: zero gradient ({head})");
        }
        // the base's weights are plain tensors: nothing for an optimiser to hold
        let base = model.without_adapters();
        assert!(base.adapters().is_empty());
        assert!(!model.lm_head_weight().is_ok_and(|w| w.is_variable()));
    }
}

/// With gradient checkpointing the fused LoRA products are kept and handed back when their
/// block is recomputed (not multiplied again); the adapters' gradients are still the plain
/// backward's, and a second checkpointed backward repeats the first bit for bit.
#[test]
fn checkpointed_adapter_gradients_equal_plain_ones() {
    for (cfg, head) in cases() {
        let (model, vars) = adapted(&cfg, head, DType::F32);
        let grads = |on: bool| -> HashMap<String, Vec<f32>> {
            let rec = candor_model::Recording::start(&[&model], on);
            let l = loss(&model);
            let mut out: HashMap<String, Vec<f32>> = HashMap::new();
            rec.backward(l, |store| -> candor_model::Result<()> {
                for (name, var) in &vars {
                    if let Some(g) = store.get(var.as_tensor()) {
                        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
                        let acc = out
                            .entry(name.clone())
                            .or_insert_with(|| vec![0.0; g.len()]);
                        for (a, x) in acc.iter_mut().zip(g) {
                            *a += x;
                        }
                    }
                }
                Ok(())
            })
            .unwrap();
            out
        };
        let plain = grads(false);
        let ckpt = grads(true);
        for (name, _) in &vars {
            let (p, c) = (&plain[name], &ckpt[name]);
            let scale = p.iter().fold(0f32, |m, g| m.max(g.abs()));
            assert!(scale > 0.0, "{name}: zero gradient");
            let worst = p.iter().zip(c).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= 1e-6 * scale,
                "{name} ({head}): off by {worst} of {scale}"
            );
        }
        assert_eq!(
            ckpt,
            grads(true),
            "a second checkpointed backward repeats the first"
        );
    }
}

#[test]
fn adapter_gradients_match_finite_differences_in_f64() {
    for (cfg, head) in cases() {
        let (model, vars) = adapted(&cfg, head, DType::F64);
        let f = || -> f64 { loss(&model).to_scalar::<f64>().unwrap() };
        let grads = loss(&model).backward().unwrap();
        let mut worst = 0f64;
        for (name, var) in &vars {
            let g: Vec<f64> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let mut picks = vec![0, base.len() / 2, base.len() - 1];
            picks.push(
                (0..g.len())
                    .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                    .unwrap(),
            );
            for i in picks {
                let eps = 1e-5;
                let set = |delta: f64| {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                };
                set(eps);
                let lp = f();
                set(-eps);
                let lm = f();
                set(0.0);
                let numeric = (lp - lm) / (2.0 * eps);
                let rel = (numeric - g[i]).abs() / numeric.abs().max(g[i].abs()).max(1e-6);
                worst = worst.max(rel);
                assert!(
                    rel < 1e-4,
                    "{name}[{i}] ({head}): analytic {} vs numeric {numeric}",
                    g[i]
                );
            }
        }
        println!(
            "{} {head}: worst relative error {worst:.2e}",
            cfg.model_type
        );
    }
}

#[test]
fn adapters_off_is_the_base_model_sharing_its_weights() {
    let cfg = tiny(false);
    let (model, _) = adapted(&cfg, Head::Lm, DType::F32);
    let input = batch();
    let with = model.logits(&input).unwrap();
    let base = model.without_adapters();
    let without = base.logits(&input).unwrap();
    assert!(
        max_abs(&with, &without) > 1e-3,
        "the adapters change nothing"
    );
    // the switch, per forward
    model.set_adapters_enabled(false);
    assert_eq!(max_abs(&model.logits(&input).unwrap(), &without), 0.0);
    model.set_adapters_enabled(true);
    assert_eq!(max_abs(&model.logits(&input).unwrap(), &with), 0.0);
    // one copy of the weights: the same tensor (storage), not a copy
    assert_eq!(
        model.lm_head_weight().unwrap().id(),
        base.lm_head_weight().unwrap().id()
    );
}

#[test]
fn lora_config_rejects_unknown_keys_and_bad_values() {
    let e = serde_json::from_str::<LoraConfig>(r#"{"rank": 4, "lora_alpha": 8}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `lora_alpha`"), "{e}");
    let c: LoraConfig =
        serde_json::from_str(r#"{"rank": 4, "target_modules": ["q_proj", "qproj"]}"#).unwrap();
    let e = c.validate("sft.yaml: train.lora").unwrap_err().to_string();
    assert!(
        e.starts_with("sft.yaml: train.lora.target_modules: unknown module `qproj`"),
        "{e}"
    );
    let c = LoraConfig {
        rank: 0,
        ..Default::default()
    };
    assert!(c.validate("x").unwrap_err().to_string().contains("x.rank"));
    let c = LoraConfig {
        target_modules: vec!["c_attn".into()],
        ..Default::default()
    };
    let e = c
        .resolved_targets(candor_model::config::Arch::Llama)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`c_attn` is not a projection"), "{e}");
}

#[test]
fn bad_adapter_directories_fail_naming_the_file() {
    let src = fixture("lora/peft-llama");
    let base = std::fs::canonicalize(lora::base_dir(&src).unwrap()).unwrap();
    let copy = |edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(src.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        cfg["base_model_name_or_path"] = base.display().to_string().into();
        edit(&mut cfg);
        std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            dir.path().join("adapter_model.safetensors"),
        )
        .unwrap();
        dir
    };
    let err = |dir: &Path| {
        let e = candor_model::resolve_model_dir(dir)
            .and_then(|d| load_frozen(&d, &Device::Cpu))
            .err()
            .unwrap_or_else(|| panic!("{} loaded", dir.display()))
            .to_string();
        assert!(!e.contains('\n'), "one line: {e}");
        e
    };
    // a good copy loads
    let ok = copy(&|_| {});
    load_frozen(ok.path(), &Device::Cpu).unwrap();
    let d = copy(&|c| c["base_model_name_or_path"] = "no/such-model".into());
    let e = err(d.path());
    assert!(
        e.contains("adapter_config.json: base model `no/such-model`")
            || e.contains("models--no--such-model"),
        "{e}"
    );
    let d = copy(&|c| c["base_model_name_or_path"] = "./nowhere".into());
    assert!(err(d.path()).contains("adapter_config.json: base model `./nowhere`"));
    let d = copy(&|c| c["use_dora"] = true.into());
    assert!(err(d.path()).contains("adapter_config.json: `use_dora` is true"));
    let d = copy(&|c| c["peft_type"] = "IA3".into());
    assert!(err(d.path()).contains("adapter_config.json: `peft_type` is `IA3`"));
    let d = copy(&|_| {});
    std::fs::remove_file(d.path().join("adapter_model.safetensors")).unwrap();
    assert!(err(d.path()).contains("adapter_model.safetensors: missing"));
    let d = copy(&|_| {});
    std::fs::write(
        d.path().join("adapter_model.safetensors"),
        b"not safetensors",
    )
    .unwrap();
    assert!(err(d.path()).contains("adapter_model.safetensors: not a valid safetensors file"));
    let d = copy(&|_| {});
    std::fs::write(d.path().join("adapter_config.json"), b"{").unwrap();
    assert!(err(d.path()).contains("adapter_config.json: not valid JSON"));
    // an adapter for another model: shapes do not fit the base
    let d = copy(&|c| {
        c["base_model_name_or_path"] = std::fs::canonicalize(fixture("parity/llama-score"))
            .unwrap()
            .display()
            .to_string()
            .into()
    });
    let (file, mut t) = lora::read_adapter_tensors(d.path(), &Device::Cpu).unwrap();
    let a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    t.insert(
        a.into(),
        Tensor::zeros((4, 5), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &file).unwrap();
    let e = err(d.path());
    assert!(
        e.contains("adapter_model.safetensors: tensors `") && e.contains("make shape [32, 5]"),
        "{e}"
    );
}

/// A LoRA reward model: the adapters (from a PEFT directory, B non-zero) and the score head
/// are the trainable variables, and every one of them gets a non-zero gradient.
#[test]
fn lora_score_model_trains_adapters_and_its_head() {
    let dir = fixture("lora/peft-llama-score");
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        ..Default::default()
    };
    let (model, adapters) = lora::load_trainable(
        &lora::base_dir(&dir).unwrap(),
        "base".into(),
        Head::Score,
        &cfg,
        Some(&dir),
        DType::F32,
        &mut Rng::new(0),
        &Device::Cpu,
    )
    .unwrap();
    let vars = adapters.varmap.data().lock().unwrap().clone();
    assert_eq!(vars.len(), 2 * 2 * 2 + 1);
    assert!(vars.contains_key(&lora::peft_score_name()));
    let grads = loss(&model).backward().unwrap();
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0, "{name}: zero gradient");
    }
}

/// f32 runs the adapters (and the base) through the fused CPU kernels, f64 the composed
/// ops the finite-difference test checks: same weights, same loss and adapter gradients.
#[test]
fn f32_fused_adapter_gradients_match_f64_composed_ones() {
    for (cfg, head) in cases() {
        let (m64, v64) = adapted(&cfg, head, DType::F64);
        let (m32, v32) = adapted(&cfg, head, DType::F32);
        let (l64, l32) = (loss(&m64), loss(&m32));
        let (a, b) = (
            l64.to_scalar::<f64>().unwrap(),
            l32.to_scalar::<f32>().unwrap() as f64,
        );
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "loss {a} vs {b}");
        let (g64, g32) = (l64.backward().unwrap(), l32.backward().unwrap());
        for ((name, x64), (_, x32)) in v64.iter().zip(&v32) {
            let want: Vec<f64> = g64
                .get(x64.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got: Vec<f32> = g32
                .get(x32.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let scale = want.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
            let err = want
                .iter()
                .zip(&got)
                .fold(0f64, |m, (w, &g)| m.max((w - g as f64).abs()))
                / scale;
            assert!(err < 1e-4, "{name} ({head}): f32 gradient off by {err:.2e}");
        }
    }
}

/// A bf16 base with f32 adapters: the adapters stay f32 variables, the base's weights are
/// bf16, the logits are PEFT's to bf16 precision, and every adapter gets a gradient.
#[test]
fn bf16_base_with_f32_adapters() {
    let dir = fixture("lora/peft-llama");
    let r = reference(&dir);
    let cfg = LoraConfig {
        rank: 4,
        alpha: 12.0,
        target_modules: vec!["all-linear".into()],
        ..Default::default()
    };
    let (model, adapters) = lora::load_trainable(
        &lora::base_dir(&dir).unwrap(),
        "base".into(),
        Head::Lm,
        &cfg,
        Some(&dir),
        DType::BF16,
        &mut Rng::new(0),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(model.dtype(), DType::BF16);
    assert_eq!(model.lm_head_weight().unwrap().dtype(), DType::BF16);
    let vars = adapters.varmap.all_vars();
    assert!(vars.iter().all(|v| v.dtype() == DType::F32));
    let logits = model
        .logits(&ids(&r))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let want = &r["logits"];
    let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    let err = max_abs(&logits, want) / scale;
    // what bf16 costs the adapted model itself: its merged weights, all in bf16
    let merged = candor_model::io::read_weights(&dir, &Device::Cpu).unwrap();
    let config = read_config(&dir).unwrap();
    let tensors: HashMap<String, Tensor> = merged
        .tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(DType::BF16).unwrap()))
        .collect();
    let all_bf16 = Model::new(
        &config,
        Head::Lm,
        VarBuilder::from_tensors(tensors, DType::BF16, &Device::Cpu),
    )
    .unwrap();
    let logits16 = all_bf16.logits(&ids(&r)).unwrap();
    let merged_err = max_abs(&logits16.to_dtype(DType::F32).unwrap(), want) / scale;
    println!(
        "bf16 base + f32 adapters: logits off by {err:.2e} of the largest (the merged model all in bf16: {merged_err:.2e})"
    );
    // bf16 rounds activations along different paths (the adapter's term is added to the
    // bf16 base output): the same order of error as an all-bf16 model, not the same bits;
    // an adapter lost or mis-scaled would be off by O(1)
    assert!(err < 4.0 * merged_err, "{err} vs {merged_err}");
    let grads = logits
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .backward()
        .unwrap();
    for v in &vars {
        let g = grads.get(v.as_tensor()).expect("a gradient");
        assert_eq!(g.dtype(), DType::F32);
        let n: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(n > 0.0);
    }
}
