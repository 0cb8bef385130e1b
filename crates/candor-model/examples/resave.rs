//! Load a checkpoint with candor and write it back with candor's own saving code:
//! `cargo run -p candor-model --example resave -- IN OUT [--head lm|score]`.
//!
//! `scripts/make_parity_fixtures.py` uses it to check that what candor writes loads in
//! transformers (and, with `--head score`, to add a freshly initialised score head to an
//! `lm` checkpoint). Tokenizer files are copied alongside.

use std::path::PathBuf;

use candle_core::Device;
use candor_core::rng::Rng;
use candor_model::io::{load_trainable, read_config, save_model};
use candor_model::Head;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (src, dst) = match (args.first(), args.get(1)) {
        (Some(s), Some(d)) => (PathBuf::from(s), PathBuf::from(d)),
        _ => return Err("usage: resave IN OUT [--head lm|score]".into()),
    };
    let head = match args
        .iter()
        .position(|a| a == "--head")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
    {
        Some("lm") => Head::Lm,
        Some("score") => Head::Score,
        Some(other) => return Err(format!("--head: `{other}` (expected lm or score)").into()),
        None => read_config(&src)?.head(),
    };
    let (model, varmap) = load_trainable(&src, head, &mut Rng::new(0), &Device::Cpu)?;
    std::fs::create_dir_all(&dst)?;
    save_model(&dst, &model.config, head, &varmap)?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        if src.join(f).is_file() {
            std::fs::copy(src.join(f), dst.join(f))?;
        }
    }
    println!("{} -> {} ({head})", src.display(), dst.display());
    Ok(())
}
