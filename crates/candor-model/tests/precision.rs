//! candor's f32 CPU path (the fused kernels) against transformers' float64 on a
//! SmolLM2-shaped model (vocabulary 49152, head dim 64, GQA, tied embeddings, rope theta
//! 100000): `scripts/make_precision_fixture.py` wrote the config, the tokens and the float64
//! mean next-token loss; the weights are a formula both sides compute. The f32 loss must
//! be within 2e-5 of float64 (issue 17: the fused eval loss on SmolLM2 was 1.3e-4 away).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use candor_model::fused;
use candor_model::io::load_frozen;
use serde_json::Value;

const TOL: f64 = 2e-5;

/// The fixture's weight formula (see the script): tensor `t`, `n` elements.
fn formula(t: usize, shape: &[usize], name: &str) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let fan_in = *shape.last().unwrap() as f64;
    (0..n as u64)
        .map(|i| {
            let h = (i
                .wrapping_mul(2654435761)
                .wrapping_add(t as u64 * 40503 + 12345))
                % (1 << 32);
            let u = h as f64 / 4294967296.0;
            let w = if name.ends_with("norm.weight") {
                1.0 + 0.2 * (2.0 * u - 1.0)
            } else if name.contains("embed_tokens") {
                0.5 * (2.0 * u - 1.0)
            } else {
                (2.0 * u - 1.0) * (3.0 / fan_in).sqrt()
            };
            w as f32
        })
        .collect()
}

#[test]
fn fused_f32_loss_is_within_2e5_of_float64() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/precision");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("reference.json")).unwrap())
            .unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
            .unwrap();
    let (v, c, inter) = (
        config["vocab_size"].as_u64().unwrap() as usize,
        config["hidden_size"].as_u64().unwrap() as usize,
        config["intermediate_size"].as_u64().unwrap() as usize,
    );
    let (heads, kv, d) = (
        config["num_attention_heads"].as_u64().unwrap() as usize,
        config["num_key_value_heads"].as_u64().unwrap() as usize,
        config["head_dim"].as_u64().unwrap() as usize,
    );
    let shape_of = |name: &str| -> Vec<usize> {
        let tail = name.rsplit('.').nth(1).unwrap();
        match tail {
            "embed_tokens" => vec![v, c],
            "input_layernorm" | "post_attention_layernorm" | "norm" => vec![c],
            "q_proj" => vec![heads * d, c],
            "k_proj" | "v_proj" => vec![kv * d, c],
            "o_proj" => vec![c, heads * d],
            "gate_proj" | "up_proj" => vec![inter, c],
            "down_proj" => vec![c, inter],
            other => panic!("unknown weight {other}"),
        }
    };
    let mut weights = HashMap::new();
    for (t, name) in reference["weights"].as_array().unwrap().iter().enumerate() {
        let name = name.as_str().unwrap();
        let shape = shape_of(name);
        let data = formula(t, &shape, name);
        weights.insert(
            name.to_string(),
            Tensor::from_vec(data, shape, &Device::Cpu).unwrap(),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors")).unwrap();
    std::fs::copy(fixture.join("config.json"), dir.path().join("config.json")).unwrap();
    let model = load_frozen(dir.path(), &Device::Cpu).unwrap();

    let tokens: Vec<Vec<u32>> = reference["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let (b, t) = (tokens.len(), tokens[0].len());
    let inputs: Vec<u32> = tokens.iter().flat_map(|r| r[..t - 1].to_vec()).collect();
    let targets: Vec<u32> = tokens.iter().flat_map(|r| r[1..].to_vec()).collect();
    let inputs = Tensor::from_vec(inputs, (b, t - 1), &Device::Cpu).unwrap();
    let hidden = model.forward_hidden(&inputs, None, None, None).unwrap();
    assert!(
        fused::enabled(&hidden),
        "f32 on the CPU takes the fused kernels"
    );
    let n = b * (t - 1);
    let sum = fused::lm_head_xent(
        &hidden.reshape((n, c)).unwrap(),
        model.lm_head_weight().unwrap(),
        &targets,
        &vec![1.0; n],
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    let loss = sum as f64 / n as f64;
    let want = reference["mean_loss_f64"].as_f64().unwrap();
    let err = (loss - want).abs();
    println!(
        "candor f32 (fused, {:?}) {loss:.9}, float64 {want:.9}: |diff| {err:.2e}",
        fused::isa::isa()
    );
    assert!(
        err < TOL,
        "f32 loss {loss} is {err:.2e} from float64 {want} (bound {TOL:.0e})"
    );
}
