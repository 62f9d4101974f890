//! The crate's single error type.
//!
//! Every message is meant to be read by a person who just pointed vicuna at a model
//! folder: it names the file (and the tensor or field), says what was expected, and
//! where it can, how to fix it. Messages are always ONE line, because they end up in
//! logs and CLI output where a multi-line message gets cut or interleaved.

use std::fmt;

/// An error from reading a model folder. `Display` is one line.
#[derive(Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Builds an error; line breaks in `message` are flattened so the one-line promise holds
    /// even when a message embeds text from a file (a JSON parser message, a tensor name).
    pub fn new(message: impl Into<String>) -> Error {
        let message: String = message.into();
        let message = if message.contains(['\n', '\r']) {
            message.split(['\n', '\r']).filter(|part| !part.is_empty()).collect::<Vec<_>>().join(" ")
        } else {
            message
        };
        Error { message }
    }

    /// The message, the same text as `Display`.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    // Debug prints the message too, so `unwrap()` / `expect()` failures stay readable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error({:?})", self.message)
    }
}

impl std::error::Error for Error {}

/// Shorthand used across the crate: `bail!("...", args)` returns an `Err(Error)`.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::new(format!($($arg)*)))
    };
}
pub(crate) use bail;
