//! `kiln serve --config FILE`: a TOML file of `kiln serve` settings, one key
//! per flag, merged into the command line with clap as the one definition
//! of every flag, its type, parser and default.
//!
//! Precedence, highest first: the command line, the environment (`KILN_*`),
//! the config file, the flag's default. A key is a flag's long name as
//! typed (`max-vms = 4`, `allow-ro-path = ["/dev/kvm"]`); for a repeatable
//! flag, values on the command line replace the file's list.
//!
//! How: the command line is parsed once as it is, which tells for each flag
//! where its value came from ([`clap::parser::ValueSource`]); the file's keys
//! for the flags that came from no higher source are then appended to the
//! command line as `--key=value` and the whole parsed again, so every value
//! goes through its flag's own parser and the flags' rules
//! (`requires`, …) hold across both. `--check-config` prints the result as
//! a config file ([`render::effective`]) instead of serving.

mod file;
mod keys;
mod render;
#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{ArgMatches, Command, Parser};

pub use file::{ConfigError, ConfigFile, Location, Setting};

/// The subcommand a config file configures.
pub const SUBCOMMAND: &str = "serve";
/// The environment variable naming the config file (as `--config`).
pub const CONFIG_ENV: &str = "KILN_CONFIG";

/// `--config` and `--check-config`, flattened into `kiln serve`'s flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// TOML file of settings, one key per flag (`max-vms = 4`); flags and
    /// KILN_* environment variables override it.
    #[arg(long, env = CONFIG_ENV, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective settings as a config file and exit, without
    /// serving (checks the file's keys, types and values, not that the
    /// files it names exist).
    #[arg(long)]
    pub check_config: bool,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Parsed<C> {
    /// Run the command.
    Run(C),
    /// `kiln serve --check-config`: print this (the effective settings as
    /// TOML) and exit successfully.
    Check(String),
}

/// Why the command line (with its config file) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// clap's own: a bad flag, `--help`, `--version`.
    #[error(transparent)]
    Usage(#[from] clap::Error),
    /// The config file.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl ArgsError {
    /// Prints the error the way the binary does (clap's own format for
    /// clap's errors, `kiln: …` with its causes otherwise) and exits: 0 for
    /// `--help` and `--version`, 2 (clap's usage code) otherwise.
    pub fn exit(self) -> ! {
        match self {
            ArgsError::Usage(e) => e.exit(),
            ArgsError::Config(e) => {
                let mut message = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    message.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                eprintln!("kiln: {message}");
                std::process::exit(2)
            }
        }
    }
}

/// Parses `argv` (program name first) as `C`, merging `kiln serve`'s
/// config file (`--config`, [`CONFIG_ENV`]) as the module docs say.
pub fn parse<C: Parser>(
    argv: impl IntoIterator<Item = impl Into<OsString>>,
) -> Result<Parsed<C>, ArgsError> {
    let mut argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let mut command = C::command();
    command.build();
    let first = first_pass::<C>(&mut command, &argv)?;
    let Some(serve) = command.find_subcommand(SUBCOMMAND) else {
        return Ok(Parsed::Run(C::from_arg_matches(&first)?));
    };
    let mut matches = first;
    let config = serve_matches(&matches)
        .and_then(|sub| sub.try_get_one::<PathBuf>("config").ok().flatten())
        .cloned();
    if let Some(path) = config {
        let file = ConfigFile::read(&path, serve)?;
        if let Some(given) = serve_matches(&matches) {
            argv.extend(lower_precedence(&file, given));
        }
        matches = C::command()
            .try_get_matches_from(&argv)
            .map_err(|e| file_value_error(e, &file))?;
    }
    if let Some(sub) = serve_matches(&matches) {
        if let Ok(Some(true)) = sub.try_get_one::<bool>("check_config") {
            return Ok(Parsed::Check(render::effective(serve, sub)));
        }
    }
    Ok(Parsed::Run(C::from_arg_matches(&matches)?))
}

/// The command line parsed as it is. When that fails, the file may be what
/// completes it (`--tls-cert` given, its `tls-key` in the file), so it is
/// parsed again leniently for `--config` and where each value came from; the
/// merged parse then reports whatever is still wrong. Without a config file
/// the first error stands.
fn first_pass<C: Parser>(
    command: &mut Command,
    argv: &[OsString],
) -> Result<ArgMatches, ArgsError> {
    let error = match command.try_get_matches_from_mut(argv) {
        Ok(matches) => return Ok(matches),
        Err(e) => e,
    };
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        return Err(error.into());
    }
    let lenient = C::command()
        .ignore_errors(true)
        .mut_subcommand(SUBCOMMAND, |serve| serve.ignore_errors(true))
        .try_get_matches_from(argv);
    match lenient {
        Ok(matches)
            if serve_matches(&matches)
                .is_some_and(|sub| matches!(sub.try_get_one::<PathBuf>("config"), Ok(Some(_)))) =>
        {
            Ok(matches)
        }
        _ => Err(error.into()),
    }
}

/// The matches of `kiln serve`, when that is the subcommand given.
fn serve_matches(matches: &ArgMatches) -> Option<&ArgMatches> {
    matches
        .subcommand()
        .filter(|(name, _)| *name == SUBCOMMAND)
        .map(|(_, sub)| sub)
}

/// The file's flags for the keys whose flag was neither on the command line
/// nor in the environment.
fn lower_precedence(file: &ConfigFile, given: &ArgMatches) -> Vec<OsString> {
    file.settings
        .iter()
        .filter(|setting| {
            !matches!(
                given.value_source(&setting.id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
        .flat_map(|setting| setting.args.iter().cloned())
        .collect()
}

/// A value the file gave that its flag's parser refused, as a config error
/// naming key and line; clap's error as it is otherwise (a rule across
/// flags, such as `--tls-cert` needing `--tls-key`).
fn file_value_error(error: clap::Error, file: &ConfigFile) -> ArgsError {
    let flag = match error.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(flag)) => flag.clone(),
        _ => return error.into(),
    };
    // "--unix-socket-mode <MODE>" → "unix-socket-mode".
    let key = flag
        .trim_start_matches('-')
        .split([' ', '='])
        .next()
        .unwrap_or_default();
    // The file's only if the value refused is the file's: a bad value on
    // the command line is clap's to report.
    let value = match error.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(value)) => value.clone(),
        _ => return error.into(),
    };
    let from_file = format!("--{key}={value}");
    let Some(setting) = file
        .get(key)
        .filter(|setting| setting.args.iter().any(|arg| *arg == *from_file))
    else {
        return error.into();
    };
    let reason = match std::error::Error::source(&error) {
        Some(cause) => cause.to_string(),
        None => refused_value(&error),
    };
    ConfigError::BadValue {
        at: setting.at.clone(),
        key: setting.key.clone(),
        reason,
    }
    .into()
}

/// clap's account of a refused value that has no cause of its own (a name
/// not among the possible values).
fn refused_value(error: &clap::Error) -> String {
    let value = match error.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => format!("{v:?}"),
        _ => "the value".into(),
    };
    match error.get(ContextKind::ValidValue) {
        Some(ContextValue::Strings(valid)) => {
            format!("{value} is not one of {}", valid.join(", "))
        }
        _ => format!("{value} is refused"),
    }
}
