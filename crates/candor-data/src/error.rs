use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A problem in a file, with the line when there is one.
    #[error("{}{}: {msg}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    File {
        path: PathBuf,
        line: Option<usize>,
        msg: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Core(#[from] candor_core::Error),
    #[error("{0}")]
    Msg(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub fn file_err(path: &std::path::Path, msg: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        line: None,
        msg: msg.into(),
    }
}

pub fn line_err(path: &std::path::Path, line: usize, msg: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        line: Some(line),
        msg: msg.into(),
    }
}
