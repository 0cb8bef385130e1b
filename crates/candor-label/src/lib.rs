//! `candor label`: the human ranking loop as a web page for a team of labellers.
//!
//! InstructGPT's reward model was trained on rankings that a team of labellers wrote
//! through a web interface: each saw a prompt and K responses, put them in order, flagged
//! harmful or untruthful ones, and several labellers ranked the same prompts so that their
//! agreement could be measured. This crate is that interface:
//!
//! - [`book`]: the candidates to rank and the rankings written so far; who gets which
//!   prompt next (each prompt goes to `overlap` different labellers); every answer appended
//!   and fsynced at once, in the format `candor rank` writes (plus `labeller`, `seconds`,
//!   `flags`, `comment`), so a restarted server continues where it stopped.
//! - [`team`]: the labellers file (names and tokens).
//! - [`stats`]: per-labeller counts and time, pairwise agreement and Kendall's τ-b, flags.
//! - [`server`]: the HTTP server (axum on tokio) and its one page (plain HTML/CSS/JS in the
//!   binary).

pub mod book;
pub mod server;
pub mod stats;
pub mod team;

pub use server::{ServeOptions, Server};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Data(#[from] candor_data::Error),
    #[error("{0}")]
    Msg(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn err(msg: impl Into<String>) -> Error {
    Error::Msg(msg.into())
}
