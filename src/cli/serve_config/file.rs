//! Reading a config file: TOML into the command-line flags it stands for,
//! each key checked against its flag's type, each remembered with its line
//! so that an error can point at it.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::{ArgAction, Command};
use toml::{Spanned, Value};

use super::keys::{self, Kind, Scalar};

/// A config file's errors, each naming the file and, where it has one, the
/// line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading the config file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{at}: {message}")]
    Syntax {
        /// Where.
        at: Location,
        /// The TOML parser's account, without its snippet.
        message: String,
    },
    /// A key that is no flag of `kiln serve`.
    #[error("{at}: unknown key {key:?}{}", hint(suggestion.as_deref()))]
    UnknownKey {
        /// Where.
        at: Location,
        /// The key as written.
        key: String,
        /// The key probably meant.
        suggestion: Option<String>,
    },
    /// A table (`[vm]`): the keys are flat.
    #[error("{at}: unknown table [{key}]: every key is a `kiln serve` flag at the top level")]
    Table {
        /// Where.
        at: Location,
        /// The table's name.
        key: String,
    },
    /// A value of the wrong TOML type for its key.
    #[error("{at}: {key:?} must be {expected}")]
    WrongType {
        /// Where.
        at: Location,
        /// The key.
        key: String,
        /// "an integer", "an array of strings", …
        expected: String,
    },
    /// A value the flag's own parser refused (a bad mode, address, name).
    #[error("{at}: {key:?}: {reason}")]
    BadValue {
        /// Where.
        at: Location,
        /// The key.
        key: String,
        /// The parser's reason.
        reason: String,
    },
}

fn hint(suggestion: Option<&str>) -> String {
    suggestion.map_or_else(String::new, |s| format!(" (did you mean {s:?}?)"))
}

/// A place in a config file, as errors print it: `config PATH line N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file.
    pub path: PathBuf,
    /// 1-based, when known.
    pub line: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config {}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, " line {line}")?;
        }
        Ok(())
    }
}

/// One key of the file, as the flags it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The key (the flag's long name).
    pub key: String,
    /// The clap id of its argument.
    pub id: String,
    /// Where it was written.
    pub at: Location,
    /// The flags, `--key=value` once per value; empty for a switch that is
    /// off or an empty array.
    pub args: Vec<OsString>,
}

/// A parsed, checked config file.
#[derive(Debug, Clone, Default)]
pub struct ConfigFile {
    /// Its settings, in the order of the file.
    pub settings: Vec<Setting>,
}

impl ConfigFile {
    /// Reads and checks `path` against the flags of `serve`.
    pub fn read(path: &Path, serve: &Command) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text, serve)
    }

    /// Checks `text`, the contents of `path`, against the flags of `serve`.
    pub fn parse(path: &Path, text: &str, serve: &Command) -> Result<Self, ConfigError> {
        let at = |offset: Option<usize>| Location {
            path: path.to_owned(),
            line: offset.map(|o| line_of(text, o)),
        };
        let table: std::collections::BTreeMap<Spanned<String>, Spanned<Value>> =
            toml::from_str(text).map_err(|e| ConfigError::Syntax {
                at: at(e.span().map(|s| s.start)),
                message: e.message().trim().to_owned(),
            })?;
        let mut entries: Vec<_> = table.into_iter().collect();
        entries.sort_by_key(|(key, _)| key.span().start);
        let settings = entries
            .into_iter()
            .map(|(key, value)| {
                let at = at(Some(key.span().start));
                let name = key.into_inner();
                setting(serve, at, name, value.into_inner())
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { settings })
    }

    /// The setting of the key `key`.
    pub fn get(&self, key: &str) -> Option<&Setting> {
        self.settings.iter().find(|s| s.key == key)
    }
}

/// The key `name` = `value` as flags, if `name` is a key and `value` its type.
fn setting(
    serve: &Command,
    at: Location,
    name: String,
    value: Value,
) -> Result<Setting, ConfigError> {
    let Some(key) = keys::find(serve, &name) else {
        if value.is_table() {
            return Err(ConfigError::Table { at, key: name });
        }
        return Err(ConfigError::UnknownKey {
            at,
            suggestion: keys::suggestion(serve, &name).map(str::to_owned),
            key: name,
        });
    };
    let wrong_type = |at: Location| ConfigError::WrongType {
        at,
        key: name.clone(),
        expected: key.kind.expected(),
    };
    let flag = |text: String| OsString::from(format!("--{}={text}", key.name));
    let args = match (key.kind, value) {
        (Kind::Bool, Value::Boolean(on)) => {
            // A switch that sets false (none yet) is given to mean `false`.
            let given = on == matches!(key.arg.get_action(), ArgAction::SetTrue);
            if given {
                vec![OsString::from(format!("--{}", key.name))]
            } else {
                Vec::new()
            }
        }
        (Kind::One(scalar), value) => {
            vec![flag(
                text(scalar, value).ok_or_else(|| wrong_type(at.clone()))?,
            )]
        }
        (Kind::Many(scalar), Value::Array(items)) => items
            .into_iter()
            .map(|item| text(scalar, item).map(flag))
            .collect::<Option<_>>()
            .ok_or_else(|| wrong_type(at.clone()))?,
        _ => return Err(wrong_type(at)),
    };
    Ok(Setting {
        key: name.clone(),
        id: key.id().to_owned(),
        at,
        args,
    })
}

/// A value as its flag's text, if it is of the type `scalar`.
fn text(scalar: Scalar, value: Value) -> Option<String> {
    match (scalar, value) {
        (Scalar::Integer | Scalar::Float, Value::Integer(i)) => Some(i.to_string()),
        (Scalar::Float, Value::Float(f)) => Some(f.to_string()),
        (Scalar::String, Value::String(s)) => Some(s),
        _ => None,
    }
}

/// The 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    1 + text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}
