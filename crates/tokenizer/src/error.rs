//! The crate's error type: one line saying what went wrong, in which file, and
//! how to fix it.

use std::fmt;
use std::path::Path;

/// A tokenizer could not be loaded or built.
///
/// `Display` gives one line: what went wrong, which file (when there is one),
/// and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A problem with a particular file.
    pub(crate) fn in_file(path: &Path, what: impl fmt::Display, fix: &str) -> Error {
        Error(format!("{what} in {}: {fix}", path.display()))
    }

    /// A problem with data that did not come from a file (e.g. vectors handed
    /// to [`crate::SentencePieceBpe::from_parts`]).
    pub(crate) fn invalid(what: impl fmt::Display, fix: &str) -> Error {
        Error(format!("{what}: {fix}"))
    }

    /// The message, as `Display` shows it.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}
