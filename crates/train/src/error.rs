//! The crate's error: one line a user can act on (the file and line when it comes from input).
//! Errors of the crates below are wrapped as they are, like `vicuna_model::Error` wraps the
//! weights crate's, so their message (and `source()`) survive unchanged.

use std::fmt;

#[derive(Debug)]
pub enum Error {
    Weights(vicuna_weights::Error),
    Model(vicuna_model::Error),
    Tokenizer(vicuna_tokenizer::Error),
    Tensor(candle_core::Error),
    /// Bad input or a failed step of training itself, already one line.
    Input(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Line breaks are flattened (by the weights crate's rule): the message must stay one line in
    /// logs and on the terminal even when it quotes a file.
    pub fn new(message: impl Into<String>) -> Self {
        Error::Input(vicuna_weights::Error::new(message).message().to_string())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Weights(e) => write!(f, "{e}"),
            Error::Model(e) => write!(f, "{e}"),
            Error::Tokenizer(e) => write!(f, "{e}"),
            Error::Tensor(e) => write!(f, "tensor error: {e}"),
            Error::Input(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Weights(e) => Some(e),
            Error::Model(e) => Some(e),
            Error::Tokenizer(e) => Some(e),
            Error::Tensor(e) => Some(e),
            Error::Input(_) => None,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Tensor(e)
    }
}

impl From<vicuna_model::Error> for Error {
    fn from(e: vicuna_model::Error) -> Self {
        Error::Model(e)
    }
}

impl From<vicuna_weights::Error> for Error {
    fn from(e: vicuna_weights::Error) -> Self {
        Error::Weights(e)
    }
}

impl From<vicuna_tokenizer::Error> for Error {
    fn from(e: vicuna_tokenizer::Error) -> Self {
        Error::Tokenizer(e)
    }
}

macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::new(format!($($arg)*)))
    };
}
pub(crate) use bail;
