#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Core(#[from] candor_core::Error),
    #[error(transparent)]
    Model(#[from] candor_model::Error),
    #[error(transparent)]
    Data(#[from] candor_data::Error),
    #[error("{0}")]
    Msg(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A one-line error message (`file: key: what was expected`), for a stage's checks.
pub fn err(msg: impl Into<String>) -> Error {
    Error::Msg(msg.into())
}
