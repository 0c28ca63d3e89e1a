//! The effective settings of `kiln serve`, whatever they came from, written
//! as a config file (`--check-config`): every key, in the order of the
//! flags, so that the output read back as `--config` means the same.

use std::ffi::OsStr;
use std::fmt::Write as _;

use clap::{ArgMatches, Command};
use toml::Value;

use super::keys::{self, Key, Kind, Scalar};

/// The first line of the output.
const HEADER: &str = "# kiln serve: effective settings \
                      (command line > environment > config file > defaults)\n";

/// Every key of `serve` with the value `matches` (its parsed arguments)
/// holds, as TOML; a key without a value is a comment, `# KEY: not set`
/// (an empty list is `[]`).
pub fn effective(serve: &Command, matches: &ArgMatches) -> String {
    let mut out = String::from(HEADER);
    for key in keys::keys(serve) {
        let raw: Option<Vec<&OsStr>> = matches
            .try_get_raw(key.id())
            .ok()
            .flatten()
            .map(Iterator::collect);
        // Infallible: writing into a String.
        let _ = match (raw, key.kind) {
            (None, Kind::Many(_)) => writeln!(out, "{} = []", key.name),
            (None, _) => writeln!(out, "# {}: not set", key.name),
            (Some(values), _) => writeln!(out, "{} = {}", key.name, value(&key, &values)),
        };
    }
    out
}

/// The TOML for the raw values of `key`.
fn value(key: &Key<'_>, raw: &[&OsStr]) -> String {
    match key.kind {
        // The value the switch leaves (a switch that sets false, none yet,
        // reads `false` when given, as its key does).
        Kind::Bool => raw.first().is_some_and(|v| *v == "true").to_string(),
        Kind::One(scalar) => raw
            .first()
            .map_or_else(String::new, |v| scalar_value(scalar, v)),
        Kind::Many(scalar) => {
            let items: Vec<String> = raw.iter().map(|v| scalar_value(scalar, v)).collect();
            format!("[{}]", items.join(", "))
        }
    }
}

/// One raw value as a TOML integer, number or string.
fn scalar_value(scalar: Scalar, raw: &OsStr) -> String {
    let text = raw.to_string_lossy();
    let typed = match scalar {
        Scalar::Integer => text.parse::<i64>().ok().map(Value::Integer),
        Scalar::Float => text.parse::<f64>().ok().map(Value::Float),
        Scalar::String => None,
    };
    typed
        .unwrap_or_else(|| Value::String(text.into_owned()))
        .to_string()
}
