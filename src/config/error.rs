//! `ConfigError`: a configuration problem with the path of the field that causes it,
//! displayed on one line; and the YAML reader that fills in that path.

use std::fmt;

/// A configuration problem, with the field path that causes it.
///
/// Displayed as `field.path: what is wrong and how to fix it`, followed by the
/// YAML parser's line and column where it knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending field, e.g. `routes[1].upstream`. Empty for file-level errors.
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Deserialize `text` into `T`, reporting the full path of the offending field
/// (serde_yaml alone stops at the enclosing mapping for values that fail their
/// own checks) followed by the parser's line and column.
pub(super) fn from_yaml_text<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text)).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        // "." is the document root; a "?" segment means a syntax error, where the
        // parser's line and column say more than a half-built path.
        let path = if path == "." || path.contains('?') {
            String::new()
        } else {
            path
        };
        let message = strip_enclosing_path(&message, &path).to_string();
        ConfigError::new(path, message)
    })
}

/// serde_yaml prefixes its message with the path it knows, which is the full
/// path or a prefix of it; drop it, since the full path goes in front.
fn strip_enclosing_path<'a>(message: &'a str, path: &str) -> &'a str {
    match message.split_once(": ") {
        Some((known, rest)) if !path.is_empty() && path.starts_with(known) => rest,
        _ => message,
    }
}

impl fmt::Display for ConfigError {
    /// Always one line: line breaks inside key names or values are escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let one_line = |s: &str| s.replace('\n', "\\n").replace('\r', "\\r");
        if self.path.is_empty() {
            write!(f, "{}", one_line(&self.message))
        } else {
            write!(f, "{}: {}", one_line(&self.path), one_line(&self.message))
        }
    }
}

impl std::error::Error for ConfigError {}
