//! The crate's error: one line a user can act on (the file and line when it comes from input).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Line breaks are flattened: the message must stay one line in logs and on the terminal.
    pub fn new(message: impl Into<String>) -> Self {
        let message: String = message.into();
        let message = if message.contains(['\n', '\r']) {
            message.split(['\n', '\r']).filter(|p| !p.is_empty()).collect::<Vec<_>>().join(" ")
        } else {
            message
        };
        Error { message }
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::new(format!("tensor error: {e}"))
    }
}

impl From<vicuna_model::Error> for Error {
    fn from(e: vicuna_model::Error) -> Self {
        Error::new(e.to_string())
    }
}

impl From<vicuna_weights::Error> for Error {
    fn from(e: vicuna_weights::Error) -> Self {
        Error::new(e.to_string())
    }
}

impl From<vicuna_tokenizer::Error> for Error {
    fn from(e: vicuna_tokenizer::Error) -> Self {
        Error::new(e.to_string())
    }
}

macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::new(format!($($arg)*)))
    };
}
pub(crate) use bail;
