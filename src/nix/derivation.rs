//! Nix derivations (`.drv` files) in their ATerm form:
//!
//! ```text
//! Derive([outputs],[inputDrvs],[inputSrcs],"system","builder",[args],[env])
//! outputs:   ("name","/nix/store/…","hashAlgo","hash")
//! inputDrvs: ("/nix/store/….drv",["out",…])
//! env:       ("key","value")
//! ```
//!
//! Strings are double-quoted with the escapes Nix writes: `\"`, `\\`, `\n`,
//! `\r`, `\t`. Nix's reader turns any other `\c` into `c`; Nix never writes
//! one, so kiln rejects it as a sign of a damaged file. Environment values
//! are bytes (Nix strings need not be UTF-8); everything else must be UTF-8
//! because it ends up in protobuf `string` fields.
//!
//! Parsing never panics: every malformed input yields a [`DerivationError`]
//! naming the byte offset and what was expected there.
//!
//! The reader is in `parse` (a cursor that reports where it stopped), the
//! writer in `write`.

mod modulo;
mod parse;
mod write;

pub use modulo::OutputPathError;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::store_path::{StorePath, StorePathError};

/// One output of a derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Where the output goes; `None` for floating content-addressed outputs,
    /// whose path is only known after the build.
    pub path: Option<StorePath>,
    /// For fixed-output derivations, e.g. `r:sha256` or `sha256`; else empty.
    pub hash_algorithm: String,
    /// For fixed-output derivations, the expected hash (hex); else empty.
    pub hash: String,
}

/// A parsed derivation. Maps keep Nix's order (sorted), so
/// [`Derivation::to_aterm`] reproduces the file byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    /// Outputs by name (`out`, `dev`, …).
    pub outputs: BTreeMap<String, Output>,
    /// Input derivations and which of their outputs are needed.
    pub input_derivations: BTreeMap<StorePath, BTreeSet<String>>,
    /// Input sources: store paths needed as they are.
    pub input_sources: BTreeSet<StorePath>,
    /// The platform the build needs, e.g. `x86_64-linux`.
    pub system: String,
    /// Absolute path of the program to run.
    pub builder: String,
    /// Arguments after `argv[0]`.
    pub arguments: Vec<String>,
    /// The derivation's environment, before Nix adds its own variables.
    pub environment: BTreeMap<String, Vec<u8>>,
}

/// Why a derivation could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum DerivationError {
    /// The `.drv` file could not be read.
    #[error("reading derivation {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O failure.
        #[source]
        source: std::io::Error,
    },
    /// The text does not follow the ATerm grammar.
    #[error("at byte {pos}: expected {expected}, found {found}")]
    Syntax {
        /// Byte offset of the problem.
        pos: usize,
        /// What the grammar allows here.
        expected: &'static str,
        /// What is there instead.
        found: String,
    },
    /// A backslash escape Nix never writes.
    #[error(
        "at byte {pos}: unknown escape {found} in string (Nix writes only \\\" \\\\ \\n \\r \\t)"
    )]
    Escape {
        /// Byte offset of the backslash.
        pos: usize,
        /// The escaped character.
        found: String,
    },
    /// A string that must be UTF-8 is not.
    #[error("at byte {pos}: {what} is not UTF-8")]
    NotUtf8 {
        /// Byte offset of the string.
        pos: usize,
        /// Which field it is.
        what: &'static str,
    },
    /// A string that must be a store path is not.
    #[error("at byte {pos}: {what} is not a store path")]
    StorePath {
        /// Byte offset of the string.
        pos: usize,
        /// Which field it is.
        what: &'static str,
        /// What is wrong with it.
        #[source]
        source: StorePathError,
    },
    /// The same key appears twice in a list Nix writes as a map.
    #[error("at byte {pos}: duplicate {what} {key:?}")]
    Duplicate {
        /// Byte offset of the second occurrence.
        pos: usize,
        /// Which list.
        what: &'static str,
        /// The repeated key.
        key: String,
    },
}

impl Derivation {
    /// Reads and parses a `.drv` file.
    pub fn read(path: &Path) -> Result<Self, DerivationError> {
        let bytes = std::fs::read(path).map_err(|source| DerivationError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&bytes)
    }

    /// Parses the ATerm text of a derivation.
    pub fn parse(input: &[u8]) -> Result<Self, DerivationError> {
        parse::derivation(input)
    }

    /// Whether this is a fixed-output derivation: a single output `out`
    /// whose hash is given (Nix then allows network access).
    pub fn is_fixed_output(&self) -> bool {
        self.outputs.len() == 1 && self.outputs.get("out").is_some_and(|o| !o.hash.is_empty())
    }

    /// Whether the derivation asks for structured attributes (`__json`).
    pub fn has_structured_attrs(&self) -> bool {
        self.environment.contains_key("__json")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    const SIMPLE: &str = r#"Derive([("out","/nix/store/a1y4cnk9c02vchdkas3s8fk3hcp0rg4h-envtest","","")],[("/nix/store/pcsq4jr6lxlghmvivn6w37dcz24qlwwd-envtest.drv",["dev","out"])],["/nix/store/qm8hwphp6fqgwq44gbk5704r93gzs798-tools"],"x86_64-linux","/nix/store/qm8hwphp6fqgwq44gbk5704r93gzs798-tools/bin/busybox",["sh","-c","echo"],[("out","/nix/store/a1y4cnk9c02vchdkas3s8fk3hcp0rg4h-envtest"),("weird","a\"b\\c\td\r\n")])"#;

    #[test]
    fn parses_every_field() {
        let drv = Derivation::parse(SIMPLE.as_bytes()).unwrap();
        let out = &drv.outputs["out"];
        assert_eq!(out.path.as_ref().unwrap().name(), "envtest");
        assert!(out.hash.is_empty());
        let (input, names) = drv.input_derivations.iter().next().unwrap();
        assert!(input.is_derivation());
        assert_eq!(names.iter().collect::<Vec<_>>(), ["dev", "out"]);
        assert_eq!(drv.input_sources.len(), 1);
        assert_eq!(drv.system, "x86_64-linux");
        assert!(drv.builder.ends_with("/bin/busybox"));
        assert_eq!(drv.arguments, ["sh", "-c", "echo"]);
        assert_eq!(drv.environment["weird"], b"a\"b\\c\td\r\n");
        assert!(!drv.is_fixed_output());
        assert_eq!(drv.to_aterm(), SIMPLE.as_bytes());
    }

    fn error(input: &str) -> String {
        Derivation::parse(input.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_position_and_expectation() {
        assert_eq!(
            error("Derive(["),
            "at byte 8: expected `(` opening an output, found end of input"
        );
        assert_eq!(error("Derivx"), "at byte 0: expected `Derive(`, found `D`");
        assert!(error(&SIMPLE.replace("\\t", "\\q")).contains("unknown escape `q`"));
        assert!(error(&format!("{SIMPLE} ")).contains("end of input after the closing"));
        assert!(error(&SIMPLE.replace("/nix/store/qm8", "/nix/stor/qm8"))
            .contains("input source is not a store path"));
        let dup = SIMPLE.replace(r#"("weird""#, r#"("out""#);
        assert!(error(&dup).contains("duplicate environment variable \"out\""));
    }

    #[test]
    fn environment_values_may_be_bytes_but_names_not() {
        let mut bytes = SIMPLE.as_bytes().to_vec();
        let at = SIMPLE.find("a\\\"b").unwrap();
        bytes[at] = 0xff;
        let drv = Derivation::parse(&bytes).unwrap();
        assert_eq!(drv.environment["weird"][0], 0xff);
        assert_eq!(drv.to_aterm(), bytes);
        let at = SIMPLE.find("weird").unwrap();
        bytes[at] = 0xff;
        assert!(matches!(
            Derivation::parse(&bytes),
            Err(DerivationError::NotUtf8 { .. })
        ));
    }

    #[test]
    fn never_panics_on_truncated_or_garbled_input() {
        let input = SIMPLE.as_bytes();
        for len in 0..input.len() {
            assert!(Derivation::parse(&input[..len]).is_err(), "prefix {len}");
        }
        // A small deterministic generator: flip, drop or duplicate bytes.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5000 {
            let mut garbled = input.to_vec();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % garbled.len();
                match next() % 3 {
                    0 => garbled[at] = next() as u8,
                    1 => drop(garbled.remove(at)),
                    _ => garbled.insert(at, garbled[at]),
                }
            }
            let _ = Derivation::parse(&garbled);
        }
    }
}
