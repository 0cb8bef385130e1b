//! candor-model: one decoder-only transformer for every stage.
//!
//! - [`config`]: the Hugging Face style `config.json`.
//! - [`model`]: llama-style blocks (RMSNorm, rotary embeddings, grouped-query attention,
//!   SwiGLU), `lm` and `score` heads, a KV cache. Every op on the training path has a
//!   backward in candle (see [`ops`]).
//! - [`io`]: weights in and out with Hugging Face tensor names (the `VarBuilder` paths
//!   in `model.rs` *are* the naming map, for loading and saving alike).
//! - [`fused`]: CPU kernels with hand-written backward passes (matmul, RMSNorm, RoPE,
//!   attention, SwiGLU, LM head + cross-entropy) that the model uses for f32 on the CPU
//!   (GPT-2's LayerNorm, Conv1D, GELU and learned positions stay composed).
//! - [`checkpoint`]: gradient checkpointing (block activations recomputed in the backward).
//! - [`generate`]: batched sampling with the KV cache (temperature, top-k, top-p).
//! - [`layers`]: the switches between the Llama family and GPT-2 (norm, projections, MLP).
//! - [`hf`]: `hf:ORG/NAME` and local checkpoint directories ([`hf::resolve_model_dir`]).
//! - [`lora`]: LoRA adapters (PEFT's format): training on a frozen base, loading, merging.
//! - [`gguf`]: import a llama.cpp GGUF file (dequantized) as a checkpoint.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod io;
pub mod layers;
pub mod lora;
pub mod mask;
pub mod model;
pub mod ops;

pub use candor_core::checkpoint::Head;
pub use checkpoint::Recording;
pub use config::ModelConfig;
pub use error::{Error, Result};
pub use hf::resolve_model_dir;
pub use lora::LoraConfig;
pub use model::{KvCache, Model};
