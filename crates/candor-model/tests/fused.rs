//! Every fused kernel against its composed reference, in value and in gradient, on random
//! f32 inputs of several shapes (sizes that are not multiples of the kernels' blocks
//! included) and, for attention, with candor's masks: causal, padding, packed segments,
//! an arbitrary bias, grouped-query heads.
//!
//! Error measure: max |fused − reference| / max |reference| over the tensor (the relative
//! error of the whole tensor; element-wise ratios blow up near zero). Bound: 1e-5.

use candle_core::{DType, Device, Tensor, Var};
use candor_core::rng::Rng;
use candor_model::fused::{self, AttnMask};
use candor_model::mask::{causal_bias, Layout};
use candor_model::ops;

const TOL: f64 = 1e-5;

fn randn(rng: &mut Rng, shape: &[usize], scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.normal() * scale) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn var(rng: &mut Rng, shape: &[usize], scale: f64) -> Var {
    Var::from_tensor(&randn(rng, shape, scale)).unwrap()
}

fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims());
    let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let scale = w
        .iter()
        .fold(0f64, |m, &x| m.max(x.abs() as f64))
        .max(1e-30);
    g.iter()
        .zip(&w)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()))
        / scale
}

/// Run `f` twice on the same variables (fused, reference), backprop `Σ out·r` through each,
/// and compare outputs and every variable's gradient. Returns the worst error.
fn check(
    what: &str,
    vars: &[&Var],
    r: &Tensor,
    fused: impl Fn() -> Tensor,
    reference: impl Fn() -> Tensor,
) -> f64 {
    let (a, b) = (fused(), reference());
    let mut worst = rel_err(&a, &b);
    assert!(worst < TOL, "{what}: value error {worst:.2e}");
    let ga = (a * r).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (b * r).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let (x, y) = (ga.get(v.as_tensor()), gb.get(v.as_tensor()));
        let (x, y) = (
            x.unwrap_or_else(|| panic!("{what}: fused gave input {i} no gradient")),
            y.unwrap(),
        );
        let e = rel_err(x, y);
        assert!(e < TOL, "{what}: gradient of input {i} error {e:.2e}");
        worst = worst.max(e);
    }
    println!("{what}: worst relative error {worst:.2e}");
    worst
}

#[test]
fn linear_matches_matmul() {
    let mut rng = Rng::new(1);
    for (lead, k, n) in [
        (vec![2, 5], 7, 3),
        (vec![3, 33], 64, 100),
        (vec![1, 1], 16, 8),
        (vec![130], 48, 257),
    ] {
        let mut xs = lead.clone();
        xs.push(k);
        let x = var(&mut rng, &xs, 1.0);
        let w = var(&mut rng, &[n, k], 0.3);
        let mut ys = lead.clone();
        ys.push(n);
        let r = randn(&mut rng, &ys, 1.0);
        check(
            &format!("linear {xs:?}x{n}"),
            &[&x, &w],
            &r,
            || fused::linear(x.as_tensor(), w.as_tensor()).unwrap(),
            || {
                x.as_tensor()
                    .broadcast_matmul(&w.as_tensor().t().unwrap())
                    .unwrap()
            },
        );
    }
}

/// The frozen base product plus a LoRA adapter's term against the same composed from
/// candle's matmuls; the frozen weight gets no gradient, x, A and B theirs.
#[test]
fn lora_linear_matches_base_plus_adapter() {
    let mut rng = Rng::new(7);
    for (lead, k, n, rank, scale) in [
        (vec![2, 5], 7, 3, 2, 2.0),
        (vec![3, 33], 64, 100, 16, 2.0),
        (vec![1, 1], 16, 8, 4, 0.5),
        (vec![130], 48, 257, 8, 4.0),
    ] {
        let mut xs = lead.clone();
        xs.push(k);
        let x = var(&mut rng, &xs, 1.0);
        let w = randn(&mut rng, &[n, k], 0.3);
        let a = var(&mut rng, &[rank, k], 0.3);
        let b = var(&mut rng, &[n, rank], 0.3);
        let mut ys = lead.clone();
        ys.push(n);
        let r = randn(&mut rng, &ys, 1.0);
        check(
            &format!("lora linear {xs:?}x{n} r{rank}"),
            &[&x, &a, &b],
            &r,
            || fused::lora_linear(x.as_tensor(), &w, a.as_tensor(), b.as_tensor(), scale).unwrap(),
            || {
                let x = x.as_tensor();
                let base = x.broadcast_matmul(&w.t().unwrap()).unwrap();
                let h = x.broadcast_matmul(&a.as_tensor().t().unwrap()).unwrap();
                let d = h.broadcast_matmul(&b.as_tensor().t().unwrap()).unwrap();
                (base + (d * scale).unwrap()).unwrap()
            },
        );
        let y = fused::lora_linear(x.as_tensor(), &w, a.as_tensor(), b.as_tensor(), scale).unwrap();
        let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_none(), "the frozen weight got a gradient");
    }
}

#[test]
fn rms_norm_matches_ops_rms_norm() {
    let mut rng = Rng::new(2);
    for shape in [
        vec![2, 3, 8],
        vec![4, 37, 128],
        vec![1, 1, 5],
        vec![600, 96],
    ] {
        let x = var(&mut rng, &shape, 2.0);
        let w = var(&mut rng, &[*shape.last().unwrap()], 1.0);
        let r = randn(&mut rng, &shape, 1.0);
        check(
            &format!("rms_norm {shape:?}"),
            &[&x, &w],
            &r,
            || fused::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
            || ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
        );
    }
}

#[test]
fn rope_matches_ops_apply_rope() {
    let mut rng = Rng::new(3);
    for (b, t, h, d, per_row) in [
        (2, 5, 3, 8, false),
        (1, 37, 4, 32, false),
        (3, 7, 2, 4, true),
        (2, 40, 4, 16, true),
    ] {
        let half = d / 2;
        let (ct, st) = ops::rope_tables(d, 64, 10000.0, &Device::Cpu).unwrap();
        let (cos, sin) = if per_row {
            let pos: Vec<u32> = (0..b * t).map(|_| rng.below(60) as u32).collect();
            let p = Tensor::from_vec(pos, b * t, &Device::Cpu).unwrap();
            (
                ct.index_select(&p, 0)
                    .unwrap()
                    .reshape((b, t, half))
                    .unwrap(),
                st.index_select(&p, 0)
                    .unwrap()
                    .reshape((b, t, half))
                    .unwrap(),
            )
        } else {
            (
                ct.narrow(0, 3, t).unwrap().reshape((1, t, half)).unwrap(),
                st.narrow(0, 3, t).unwrap().reshape((1, t, half)).unwrap(),
            )
        };
        let x = var(&mut rng, &[b, t, h, d], 1.0);
        let r = randn(&mut rng, &[b, t, h, d], 1.0);
        check(
            &format!("rope b{b} t{t} h{h} d{d} per_row={per_row}"),
            &[&x],
            &r,
            || fused::rope(x.as_tensor(), &cos, &sin).unwrap(),
            || {
                let xt = x.as_tensor().transpose(1, 2).unwrap().contiguous().unwrap(); // (B, H, T, D)
                let y =
                    ops::apply_rope(&xt, &cos.unsqueeze(1).unwrap(), &sin.unsqueeze(1).unwrap())
                        .unwrap();
                y.transpose(1, 2).unwrap().contiguous().unwrap()
            },
        );
    }
}

#[test]
fn swiglu_matches_silu_times_up() {
    let mut rng = Rng::new(4);
    for shape in [vec![2, 3, 8], vec![4, 37, 352], vec![1, 1, 3]] {
        let g = var(&mut rng, &shape, 2.0);
        let u = var(&mut rng, &shape, 1.0);
        let r = randn(&mut rng, &shape, 1.0);
        check(
            &format!("swiglu {shape:?}"),
            &[&g, &u],
            &r,
            || fused::swiglu(g.as_tensor(), u.as_tensor()).unwrap(),
            || (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap(),
        );
    }
}

/// The composed attention the model's f64/CUDA path runs, on (B, T, H, D) inputs.
fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Tensor {
    let (h, kv, d) = (q.dim(2).unwrap(), k.dim(2).unwrap(), q.dim(3).unwrap());
    let q = q.transpose(1, 2).unwrap().contiguous().unwrap(); // (B, H, T, D)
    let k = ops::repeat_kv(&k.transpose(1, 2).unwrap().contiguous().unwrap(), h / kv).unwrap();
    let v = ops::repeat_kv(&v.transpose(1, 2).unwrap().contiguous().unwrap(), h / kv).unwrap();
    let att = (q.matmul(&k.t().unwrap()).unwrap() * (1.0 / (d as f64).sqrt()))
        .unwrap()
        .broadcast_add(bias)
        .unwrap();
    let y = ops::softmax(&att).unwrap().matmul(&v).unwrap(); // (B, H, T, D)
    y.transpose(1, 2).unwrap().contiguous().unwrap()
}

/// Layouts: dense, left padding (generation), right padding (training), packed segments.
fn layouts(b: usize, t: usize, rng: &mut Rng) -> Vec<(&'static str, Layout)> {
    let mut left = vec![true; b * t];
    let mut right = vec![true; b * t];
    for r in 0..b {
        let pad = rng.below(t / 2 + 1);
        left[r * t..r * t + pad].iter_mut().for_each(|v| *v = false);
        right[(r + 1) * t - pad..(r + 1) * t]
            .iter_mut()
            .for_each(|v| *v = false);
    }
    let segments: Vec<u32> = (0..b * t).map(|i| ((i % t) * 3 / t) as u32).collect();
    vec![
        ("causal", Layout::dense(b, t)),
        (
            "left-padded",
            Layout {
                batch: b,
                len: t,
                valid: left,
                segments: None,
            },
        ),
        (
            "right-padded",
            Layout {
                batch: b,
                len: t,
                valid: right.clone(),
                segments: None,
            },
        ),
        (
            "packed",
            Layout {
                batch: b,
                len: t,
                valid: right,
                segments: Some(segments),
            },
        ),
    ]
}

#[test]
fn attention_matches_composed_attention_with_masks() {
    let mut rng = Rng::new(5);
    for (b, t, h, kv, d) in [
        (2, 5, 2, 2, 4),
        (2, 37, 4, 2, 8),
        (1, 70, 2, 1, 16),
        (3, 33, 4, 4, 32),
        (2, 64, 2, 2, 8),
    ] {
        for (name, layout) in layouts(b, t, &mut rng) {
            let q = var(&mut rng, &[b, t, h, d], 1.0);
            let k = var(&mut rng, &[b, t, kv, d], 1.0);
            let v = var(&mut rng, &[b, t, kv, d], 1.0);
            let bias = layout.bias(&Device::Cpu).unwrap();
            // a query that sees no key (a padding query on the left) is unused downstream; the
            // kernel averages its causal window there, the reference all keys: leave it out
            let bv: Vec<f32> = bias.flatten_all().unwrap().to_vec1().unwrap();
            let sees: Vec<f32> = (0..b * t)
                .map(|i| {
                    if bv[i * t..(i + 1) * t].contains(&0.0) {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            let sees = Tensor::from_vec(sees, (b, t, 1, 1), &Device::Cpu).unwrap();
            let r = randn(&mut rng, &[b, t, h, d], 1.0)
                .broadcast_mul(&sees)
                .unwrap();
            let dense = layout.is_dense();
            let what = format!("attention {name} b{b} t{t} h{h} kv{kv} d{d}");
            check(
                &what,
                &[&q, &k, &v],
                &r,
                || {
                    let mask = if dense {
                        AttnMask::Causal
                    } else {
                        AttnMask::Bias {
                            bias: &bias,
                            causal: fused::attention::bias_is_causal(&bias).unwrap(),
                        }
                    };
                    let y =
                        fused::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), mask, None)
                            .unwrap();
                    y.broadcast_mul(&sees).unwrap()
                },
                || {
                    attention_reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias)
                        .broadcast_mul(&sees)
                        .unwrap()
                },
            );
        }
        // an arbitrary (non-causal) bias: the general path
        let q = var(&mut rng, &[b, t, h, d], 1.0);
        let k = var(&mut rng, &[b, t, kv, d], 1.0);
        let v = var(&mut rng, &[b, t, kv, d], 1.0);
        let bias = randn(&mut rng, &[1, 1, t, t], 2.0);
        assert!(t < 2 || !fused::attention::bias_is_causal(&bias).unwrap());
        let r = randn(&mut rng, &[b, t, h, d], 1.0);
        check(
            &format!("attention arbitrary-bias b{b} t{t} h{h} kv{kv} d{d}"),
            &[&q, &k, &v],
            &r,
            || {
                fused::attention(
                    q.as_tensor(),
                    k.as_tensor(),
                    v.as_tensor(),
                    AttnMask::Bias {
                        bias: &bias,
                        causal: false,
                    },
                    None,
                )
                .unwrap()
            },
            || attention_reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias),
        );
    }
    assert!(fused::attention::bias_is_causal(&causal_bias(5, 3, &Device::Cpu).unwrap()).unwrap());
}

#[test]
fn attention_with_cache_matches_full_attention() {
    let mut rng = Rng::new(6);
    let (b, t, h, kv, d) = (2, 45, 4, 2, 8);
    let q = randn(&mut rng, &[b, t, h, d], 1.0);
    let k = randn(&mut rng, &[b, t, kv, d], 1.0);
    let v = randn(&mut rng, &[b, t, kv, d], 1.0);
    let full = fused::attention(&q, &k, &v, AttnMask::Causal, None).unwrap();
    let mut cache = None;
    let mut parts = vec![];
    // prefill 40 (the buffer starts at 64 positions), then single steps
    let mut at = 0;
    for n in [40, 1, 1, 3] {
        let s = |x: &Tensor| x.narrow(1, at, n).unwrap();
        parts.push(
            fused::attention(&s(&q), &s(&k), &s(&v), AttnMask::Causal, Some(&mut cache)).unwrap(),
        );
        at += n;
    }
    let inc = Tensor::cat(&parts, 1).unwrap();
    let e = rel_err(&inc, &full.narrow(1, 0, at).unwrap());
    assert!(e < TOL, "cached vs full: {e:.2e}");
    // a backward through the cached path is refused, not silently gradient-free
    let qv = Var::from_tensor(&q.narrow(1, 0, 1).unwrap()).unwrap();
    let mut cache = None;
    let y = fused::attention(
        qv.as_tensor(),
        &k.narrow(1, 0, 1).unwrap(),
        &v.narrow(1, 0, 1).unwrap(),
        AttnMask::Causal,
        Some(&mut cache),
    )
    .unwrap();
    assert!(y.sum_all().unwrap().backward().is_err());
}

#[test]
fn lm_head_xent_matches_token_logprobs() {
    let mut rng = Rng::new(7);
    // (4500, 8, 4096): more rows than one chunk of logits holds (xent::CHUNK_FLOATS)
    for (n, c, v) in [(5, 8, 7), (300, 32, 513), (1000, 16, 4096), (4500, 8, 4096)] {
        let hdn = var(&mut rng, &[n, c], 1.0);
        let w = var(&mut rng, &[v, c], 0.5);
        let targets: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
        let weights: Vec<f32> = (0..n).map(|i| if i % 7 == 3 { 0.0 } else { 1.0 }).collect();
        let tt = Tensor::from_vec(targets.clone(), (1, n), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(weights.clone(), (1, n), &Device::Cpu).unwrap();
        // a mean over the counted rows: the upstream gradient is not 1
        let count = weights.iter().sum::<f32>() as f64;
        let r = Tensor::new(1.0f32, &Device::Cpu).unwrap();
        check(
            &format!("lm_head_xent n{n} c{c} v{v}"),
            &[&hdn, &w],
            &r,
            || {
                (fused::lm_head_xent(hdn.as_tensor(), w.as_tensor(), &targets, &weights).unwrap()
                    / count)
                    .unwrap()
            },
            || {
                let logits = hdn
                    .as_tensor()
                    .matmul(&w.as_tensor().t().unwrap())
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let lp = ops::token_logprobs(&logits, &tt).unwrap();
                ((lp * &wt).unwrap().sum_all().unwrap().neg().unwrap() / count).unwrap()
            },
        );
    }
    let h = randn(&mut rng, &[2, 4], 1.0);
    let w = randn(&mut rng, &[3, 4], 1.0);
    let e = fused::lm_head_xent(&h, &w, &[0, 3], &[1.0, 1.0])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("target token 3 is outside the vocabulary of 3"),
        "{e}"
    );
    let _ = DType::F32;
}

/// A frozen head (LoRA: the tied embedding is not trained) gets no gradient, and the hidden
/// states' gradient is the one the trained head's case gives, bit for bit.
#[test]
fn lm_head_xent_with_a_frozen_head_gives_the_hidden_gradient_only() {
    let mut rng = Rng::new(8);
    let (n, c, v) = (300, 32, 513);
    let hdn = var(&mut rng, &[n, c], 1.0);
    let w = var(&mut rng, &[v, c], 0.5);
    let targets: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
    let weights = vec![1.0f32; n];
    let both = fused::lm_head_xent(hdn.as_tensor(), w.as_tensor(), &targets, &weights).unwrap();
    let gb = (&both * 0.5).unwrap().backward().unwrap();
    let frozen = w.as_tensor().detach();
    let one = fused::lm_head_xent(hdn.as_tensor(), &frozen, &targets, &weights).unwrap();
    assert_eq!(
        one.to_scalar::<f32>().unwrap(),
        both.to_scalar::<f32>().unwrap()
    );
    let go = (&one * 0.5).unwrap().backward().unwrap();
    assert!(gb.get(w.as_tensor()).is_some());
    assert!(go.get(&frozen).is_none(), "a frozen head got a gradient");
    let (a, b) = (
        go.get(hdn.as_tensor()).unwrap().flatten_all().unwrap(),
        gb.get(hdn.as_tensor()).unwrap().flatten_all().unwrap(),
    );
    assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
}

#[test]
fn kernels_are_deterministic() {
    let mut rng = Rng::new(8);
    let (b, t, h, d) = (3, 50, 4, 16);
    let q = var(&mut rng, &[b, t, h, d], 1.0);
    let k = var(&mut rng, &[b, t, h, d], 1.0);
    let v = var(&mut rng, &[b, t, h, d], 1.0);
    let x = var(&mut rng, &[b * t, h * d], 1.0);
    let w = var(&mut rng, &[h * d], 1.0);
    let run = || {
        let y = fused::attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            AttnMask::Causal,
            None,
        )
        .unwrap();
        let z = fused::rms_norm(
            &(y.reshape((b * t, h * d)).unwrap() + x.as_tensor()).unwrap(),
            w.as_tensor(),
            1e-5,
        )
        .unwrap();
        let g = z.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        [
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            x.as_tensor(),
            w.as_tensor(),
        ]
        .iter()
        .flat_map(|t| {
            g.get(t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect::<Vec<f32>>()
    };
    let a = run();
    for _ in 0..3 {
        assert!(a == run(), "a second run differs");
    }
}
