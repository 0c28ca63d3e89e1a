//! Which `kiln serve` arguments are config keys, and what TOML type each
//! takes, read from the clap [`Command`] itself so that a new flag is a new
//! key without a second list to keep in step.
//!
//! A key is a flag's long name as typed on the command line (`max-vms`,
//! `allow-ro-path`). Its type follows the flag's action and value parser:
//! a switch is a boolean, a repeatable flag an array, a flag parsed into an
//! integer type an integer, into a float a number, anything else a string.

use std::any::TypeId;

use clap::{Arg, ArgAction, Command};

/// Arguments of `kiln serve` that are not keys: the config file itself,
/// the check, and clap's own.
const NOT_KEYS: &[&str] = &["config", "check_config", "help", "version"];

/// The TOML type of one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scalar {
    /// A TOML integer (the flag parses into an integer type).
    Integer,
    /// A TOML float or integer.
    Float,
    /// A TOML string (paths, addresses, modes, names).
    String,
}

/// The TOML type of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A switch (`--no-network`): `true` gives the flag, `false` leaves it out.
    Bool,
    /// A flag taking one value.
    One(Scalar),
    /// A repeatable flag: an array, each element one occurrence.
    Many(Scalar),
}

impl Kind {
    /// "an integer", "an array of strings": what a wrong type is told to be.
    pub fn expected(self) -> String {
        match self {
            Kind::Bool => "a boolean (true or false)".into(),
            Kind::One(scalar) => scalar.expected().into(),
            Kind::Many(scalar) => format!("an array of {}", scalar.plural()),
        }
    }
}

impl Scalar {
    fn expected(self) -> &'static str {
        match self {
            Scalar::Integer => "an integer",
            Scalar::Float => "a number",
            Scalar::String => "a string",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Scalar::Integer => "integers",
            Scalar::Float => "numbers",
            Scalar::String => "strings",
        }
    }
}

/// A config key: the clap argument behind it and its type.
#[derive(Debug, Clone)]
pub struct Key<'a> {
    /// The long name, which is the key.
    pub name: &'a str,
    /// The argument.
    pub arg: &'a Arg,
    /// Its TOML type.
    pub kind: Kind,
}

impl Key<'_> {
    /// The clap id, for [`clap::ArgMatches`].
    pub fn id(&self) -> &str {
        self.arg.get_id().as_str()
    }
}

/// Every key of `serve`, in the order of its flags.
pub fn keys(serve: &Command) -> Vec<Key<'_>> {
    serve
        .get_arguments()
        .filter(|arg| !NOT_KEYS.contains(&arg.get_id().as_str()))
        .filter_map(|arg| {
            let name = arg.get_long()?;
            let kind = kind(arg)?;
            Some(Key { name, arg, kind })
        })
        .collect()
}

/// The key called `name`.
pub fn find<'a>(serve: &'a Command, name: &str) -> Option<Key<'a>> {
    keys(serve).into_iter().find(|key| key.name == name)
}

/// The type an argument takes in the file; `None` for actions a file
/// cannot express (help, version, counting).
fn kind(arg: &Arg) -> Option<Kind> {
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => Some(Kind::Bool),
        ArgAction::Set => Some(Kind::One(scalar(arg))),
        ArgAction::Append => Some(Kind::Many(scalar(arg))),
        _ => None,
    }
}

/// Integer and float flags by the type their parser yields; everything
/// else (including enums and types parsed from text) is a string.
fn scalar(arg: &Arg) -> Scalar {
    let produced = arg.get_value_parser().type_id();
    let integers = [
        TypeId::of::<u8>(),
        TypeId::of::<u16>(),
        TypeId::of::<u32>(),
        TypeId::of::<u64>(),
        TypeId::of::<usize>(),
        TypeId::of::<i8>(),
        TypeId::of::<i16>(),
        TypeId::of::<i32>(),
        TypeId::of::<i64>(),
        TypeId::of::<isize>(),
    ];
    if integers.iter().any(|t| produced == *t) {
        Scalar::Integer
    } else if produced == TypeId::of::<f64>() || produced == TypeId::of::<f32>() {
        Scalar::Float
    } else {
        Scalar::String
    }
}

/// The key closest to a misspelt `name`, if one is close (at most two
/// edits, or a third of its length).
pub fn suggestion<'a>(serve: &'a Command, name: &str) -> Option<&'a str> {
    let limit = (name.len() / 3).max(2);
    keys(serve)
        .into_iter()
        .map(|key| (edit_distance(name, key.name), key.name))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, name)| name)
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("max-vm", "max-vms"), 1);
        assert_eq!(edit_distance("listen", "listen"), 0);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("vcpu", "vcpus"), 1);
    }
}
