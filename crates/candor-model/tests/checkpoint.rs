//! The block-by-block backward ([`candor_model::Recording`]), with gradient checkpointing
//! (recomputed blocks) and without (kept graphs): the gradients it assembles from the
//! loss's backward and the blocks' equal the plain `loss.backward()`'s — f64
//! (composed ops) and f32 (fused kernels), Llama and GPT-2, LM and score heads, tied and
//! untied, padded (bias + positions) and dense batches, two forwards in one loss and two
//! models in one loss — and every parameter gets a non-zero gradient.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candor_core::rng::Rng;
use candor_model::mask::Layout;
use candor_model::ops::token_logprobs;
use candor_model::{Head, Model, ModelConfig, Recording};

fn llama(tied: bool, bias: bool) -> ModelConfig {
    let mut c = ModelConfig::llama(37, 16, 3, 4, 2, 24, 32, 10000.0, tied);
    c.attention_bias = bias;
    c
}

fn gpt2() -> ModelConfig {
    let mut c = ModelConfig::llama(37, 16, 2, 4, 4, 24, 32, 10000.0, true);
    c.model_type = "gpt2".into();
    c.architectures = vec!["GPT2LMHeadModel".into()];
    c.hidden_act = "gelu_new".into();
    c
}

fn configs() -> Vec<(ModelConfig, Head)> {
    vec![
        (llama(true, false), Head::Lm),
        (llama(false, true), Head::Lm),
        (llama(true, true), Head::Score),
        (gpt2(), Head::Lm),
        (gpt2(), Head::Score),
    ]
}

/// Random weights in `dtype` (norm weights 1 + noise, so no gradient is zero by symmetry),
/// the variables by name.
fn model(cfg: &ModelConfig, head: Head, dtype: DType) -> (Model, Vec<(String, Var)>) {
    let varmap = VarMap::new();
    let model = Model::new(
        cfg,
        head,
        VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu),
    )
    .unwrap();
    let mut vars: Vec<_> = varmap.data().lock().unwrap().clone().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in &vars {
        let mut rng = Rng::derive(7, name);
        let norm =
            name.contains("norm.weight") || (name.contains(".ln_") && name.ends_with(".weight"));
        let v: Vec<f64> = (0..var.elem_count())
            .map(|_| rng.normal() * 0.3 + if norm { 1.0 } else { 0.0 })
            .collect();
        let t = Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap();
        var.set(&t.to_dtype(dtype).unwrap()).unwrap();
    }
    (model, vars)
}

/// Left-padded rows (bias and position ids) or, `padded == false`, dense rows (the default
/// causal mask and positions).
fn batch(padded: bool) -> (Tensor, Option<Layout>) {
    let rows = [[0u32, 0, 5, 9, 12, 3, 7, 21], [1, 2, 3, 4, 5, 6, 36, 8]];
    let ids = Tensor::new(&rows, &Device::Cpu).unwrap();
    if !padded {
        return (ids, None);
    }
    let mut valid = vec![true; 16];
    valid[0] = false;
    valid[1] = false;
    (
        ids,
        Some(Layout {
            batch: 2,
            len: 8,
            valid,
            segments: None,
        }),
    )
}

/// A loss that reads every parameter: next-token cross-entropy (LM head) or the squared
/// last-position score (score head), weighted by `w`.
fn loss(model: &Model, ids: &Tensor, layout: Option<&Layout>, w: f64) -> Tensor {
    let dev = Device::Cpu;
    let hidden = match layout {
        Some(l) => model.forward_hidden(
            ids,
            Some(&l.positions_tensor(&dev).unwrap()),
            Some(&l.bias(&dev).unwrap()),
            None,
        ),
        None => model.forward_hidden(ids, None, None, None),
    }
    .unwrap();
    let t = ids.dim(1).unwrap();
    let l = match model.head {
        Head::Lm => {
            let logits = model
                .lm_logits(&hidden.narrow(1, 2, t - 3).unwrap())
                .unwrap();
            let lp = token_logprobs(&logits, &ids.narrow(1, 3, t - 3).unwrap()).unwrap();
            lp.mean_all().unwrap().neg().unwrap()
        }
        Head::Score => {
            let s = model.scores(&hidden).unwrap().narrow(1, t - 1, 1).unwrap();
            s.sqr().unwrap().mean_all().unwrap()
        }
    };
    (l * w).unwrap()
}

/// Each variable's gradient, the stores summed (as an optimiser accumulates them), in f64.
fn collect(vars: &[(String, Var)], stores: &mut HashMap<String, Vec<f64>>, store: &GradStore) {
    for (name, var) in vars {
        if let Some(g) = store.get(var.as_tensor()) {
            let g: Vec<f64> = g
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let acc = stores
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; g.len()]);
            for (a, x) in acc.iter_mut().zip(g) {
                *a += x;
            }
        }
    }
}

/// Gradients of `f`'s loss: one `loss.backward()` (`None`), or block by block through
/// `Recording` with checkpointing on or off (`Some(on)`).
fn grads(
    models: &[&Model],
    vars: &[(String, Var)],
    mode: Option<bool>,
    f: impl Fn() -> Tensor,
) -> (HashMap<String, Vec<f64>>, usize) {
    let mut out = HashMap::new();
    let Some(on) = mode else {
        collect(vars, &mut out, &f().backward().unwrap());
        return (out, 1);
    };
    let rec = Recording::start(models, on);
    let l = f();
    let mut pieces = 0;
    rec.backward(l, |store| -> candor_model::Result<()> {
        collect(vars, &mut out, store);
        pieces += 1;
        Ok(())
    })
    .unwrap();
    (out, pieces)
}

/// Largest difference relative to each tensor's largest gradient element; also checks that
/// every variable has a non-zero gradient on both sides.
fn compare(
    what: &str,
    vars: &[(String, Var)],
    a: &HashMap<String, Vec<f64>>,
    b: &HashMap<String, Vec<f64>>,
) -> f64 {
    let mut worst = 0f64;
    for (name, _) in vars {
        let (x, y) = (
            &a[name],
            &b.get(name)
                .unwrap_or_else(|| panic!("{what} {name}: no checkpointed gradient")),
        );
        let scale = x.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{what} {name}: zero gradient");
        assert!(
            y.iter().any(|&v| v != 0.0),
            "{what} {name}: zero checkpointed gradient"
        );
        let err = x
            .iter()
            .zip(y.iter())
            .fold(0f64, |m, (p, q)| m.max((p - q).abs()))
            / scale;
        worst = worst.max(err);
    }
    worst
}

#[test]
fn checkpointed_gradients_equal_plain_gradients() {
    for dtype in [DType::F64, DType::F32] {
        for (cfg, head) in configs() {
            for padded in [true, false] {
                let what = format!(
                    "{dtype:?} {:?} {head} tied={} padded={padded}",
                    cfg.arch(),
                    cfg.tie_word_embeddings
                );
                let (m, vars) = model(&cfg, head, dtype);
                let (ids, layout) = batch(padded);
                let f = || loss(&m, &ids, layout.as_ref(), 1.0);
                let (plain, _) = grads(&[&m], &vars, None, f);
                let (ckpt, pieces) = grads(&[&m], &vars, Some(true), f);
                let (blocks, pieces_off) = grads(&[&m], &vars, Some(false), f);
                // the loss's, one per block, the embeddings'
                assert_eq!(pieces, 1 + cfg.num_hidden_layers + 1, "{what}");
                assert_eq!(pieces_off, pieces, "{what}");
                let worst = compare(&what, &vars, &plain, &ckpt);
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
                println!("{what}: worst difference {worst:.2e}");
                assert!(
                    worst < tol,
                    "{what}: checkpointed gradients off by {worst:.2e}"
                );
                let worst = compare(&what, &vars, &plain, &blocks);
                assert!(
                    worst < tol,
                    "{what}: block-by-block gradients off by {worst:.2e}"
                );
                // only a tied head's two gradients (the head's and the lookup's) are added
                // in another order; every other gradient is the same sums in the same order
                if !cfg.tie_word_embeddings || head == Head::Score {
                    assert_eq!(worst, 0.0, "{what}: block by block, bit for bit");
                }
                // the same blocks' graphs, kept or recomputed: the same gradients, bit
                // for bit
                assert_eq!(compare(&what, &vars, &ckpt, &blocks), 0.0, "{what}");
            }
        }
    }
}

/// A loss over two forwards of one model (DPO's chosen and rejected, a reward model's pair)
/// and a forward whose output the loss never reads; and a loss over two models (PPO's
/// policy and critic).
#[test]
fn several_forwards_and_models_in_one_loss() {
    let (ids, layout) = batch(true);
    let (dense, _) = batch(false);
    let (m, vars) = model(&llama(true, false), Head::Lm, DType::F32);
    let f = || {
        let _unused = m.forward_hidden(&dense, None, None, None).unwrap().detach();
        (loss(&m, &ids, layout.as_ref(), 0.7) + loss(&m, &dense, None, -0.4)).unwrap()
    };
    let (plain, _) = grads(&[&m], &vars, None, f);
    for on in [true, false] {
        let (ckpt, pieces) = grads(&[&m], &vars, Some(on), f);
        assert_eq!(
            pieces,
            1 + 2 * (3 + 1),
            "two forwards backpropagated block by block, the unused one skipped"
        );
        let worst = compare("two forwards", &vars, &plain, &ckpt);
        assert!(worst < 1e-6, "two forwards ({on}): off by {worst:.2e}");
    }

    let (critic, critic_vars) = model(&llama(false, false), Head::Score, DType::F32);
    let all: Vec<(String, Var)> = vars
        .iter()
        .map(|(n, v)| (format!("policy.{n}"), v.clone()))
        .chain(
            critic_vars
                .iter()
                .map(|(n, v)| (format!("critic.{n}"), v.clone())),
        )
        .collect();
    let f = || {
        (loss(&m, &ids, layout.as_ref(), 1.0) + loss(&critic, &ids, layout.as_ref(), 0.5)).unwrap()
    };
    let (plain, _) = grads(&[&m, &critic], &all, None, f);
    for on in [true, false] {
        let (ckpt, _) = grads(&[&m, &critic], &all, Some(on), f);
        let worst = compare("policy and critic", &all, &plain, &ckpt);
        assert!(worst < 1e-6, "policy and critic ({on}): off by {worst:.2e}");
    }
}

/// Generation (a KV cache) is never recorded, and a recording that ends without a
/// backward leaves the model as before: the next plain forward and backward are exact.
#[test]
fn cached_forwards_and_dropped_recordings_leave_no_trace() {
    let (m, vars) = model(&llama(true, false), Head::Lm, DType::F32);
    let (ids, layout) = batch(true);
    let f = || loss(&m, &ids, layout.as_ref(), 1.0);
    let (before, _) = grads(&[&m], &vars, None, f);
    for on in [true, false] {
        let _rec = Recording::start(&[&m], on);
        let mut cache = m.new_cache();
        let a = m
            .forward_hidden(&ids.narrow(1, 0, 4).unwrap(), None, None, Some(&mut cache))
            .unwrap();
        let b = m
            .forward_hidden(&ids.narrow(1, 0, 4).unwrap(), None, None, None)
            .unwrap();
        let diff: f32 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(
            diff < 1e-5,
            "a recorded forward computes the same hidden states ({diff})"
        );
        let _ = f();
    }
    let (after, _) = grads(&[&m], &vars, None, f);
    assert_eq!(compare("after", &vars, &before, &after), 0.0);
}
