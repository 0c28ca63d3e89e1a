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
        let mut p = Parser { input, pos: 0 };
        let drv = p.derivation()?;
        if p.pos != input.len() {
            return Err(p.syntax("end of input after the closing `)`"));
        }
        Ok(drv)
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

    /// Writes the derivation back in Nix's ATerm form.
    pub fn to_aterm(&self) -> Vec<u8> {
        let mut w = Vec::new();
        w.extend_from_slice(b"Derive([");
        for (i, (name, out)) in self.outputs.iter().enumerate() {
            comma(&mut w, i);
            w.push(b'(');
            let path = out.path.as_ref().map(StorePath::to_string);
            write_strings(
                &mut w,
                [
                    name.as_bytes(),
                    path.as_deref().unwrap_or("").as_bytes(),
                    out.hash_algorithm.as_bytes(),
                    out.hash.as_bytes(),
                ],
            );
            w.push(b')');
        }
        w.extend_from_slice(b"],[");
        for (i, (drv, outputs)) in self.input_derivations.iter().enumerate() {
            comma(&mut w, i);
            w.push(b'(');
            write_string(&mut w, drv.to_string().as_bytes());
            w.extend_from_slice(b",[");
            write_strings(&mut w, outputs.iter().map(|o| o.as_bytes()));
            w.extend_from_slice(b"])");
        }
        w.extend_from_slice(b"],[");
        let sources: Vec<String> = self.input_sources.iter().map(|s| s.to_string()).collect();
        write_strings(&mut w, sources.iter().map(|s| s.as_bytes()));
        w.extend_from_slice(b"],");
        write_strings(&mut w, [self.system.as_bytes(), self.builder.as_bytes()]);
        w.extend_from_slice(b",[");
        write_strings(&mut w, self.arguments.iter().map(|a| a.as_bytes()));
        w.extend_from_slice(b"],[");
        for (i, (key, value)) in self.environment.iter().enumerate() {
            comma(&mut w, i);
            w.push(b'(');
            write_strings(&mut w, [key.as_bytes(), value.as_slice()]);
            w.push(b')');
        }
        w.extend_from_slice(b"])");
        w
    }
}

fn comma(w: &mut Vec<u8>, index: usize) {
    if index > 0 {
        w.push(b',');
    }
}

fn write_strings<'a>(w: &mut Vec<u8>, strings: impl IntoIterator<Item = &'a [u8]>) {
    for (i, s) in strings.into_iter().enumerate() {
        comma(w, i);
        write_string(w, s);
    }
}

fn write_string(w: &mut Vec<u8>, s: &[u8]) {
    w.push(b'"');
    for &b in s {
        match b {
            b'"' => w.extend_from_slice(b"\\\""),
            b'\\' => w.extend_from_slice(b"\\\\"),
            b'\n' => w.extend_from_slice(b"\\n"),
            b'\r' => w.extend_from_slice(b"\\r"),
            b'\t' => w.extend_from_slice(b"\\t"),
            _ => w.push(b),
        }
    }
    w.push(b'"');
}

/// A cursor over the input; every method either advances past what it
/// recognised or returns an error at the current position.
struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn derivation(&mut self) -> Result<Derivation, DerivationError> {
        self.literal(b"Derive(", "`Derive(`")?;
        let mut outputs = BTreeMap::new();
        self.list(|p| {
            let pos = p.pos;
            p.literal(b"(", "`(` opening an output")?;
            let name = p.utf8_string("output name")?;
            p.literal(b",", "`,`")?;
            let path_pos = p.pos;
            let path = p.utf8_string("output path")?;
            let path = match path.as_str() {
                "" => None,
                s => Some(store_path(s, path_pos, "output path")?),
            };
            p.literal(b",", "`,`")?;
            let hash_algorithm = p.utf8_string("output hash algorithm")?;
            p.literal(b",", "`,`")?;
            let hash = p.utf8_string("output hash")?;
            p.literal(b")", "`)` closing an output")?;
            let output = Output {
                path,
                hash_algorithm,
                hash,
            };
            insert_unique(&mut outputs, name, output, pos, "output")
        })?;
        self.literal(b",", "`,` after the outputs")?;
        let mut input_derivations = BTreeMap::new();
        self.list(|p| {
            let pos = p.pos;
            p.literal(b"(", "`(` opening an input derivation")?;
            let drv = p.store_path("input derivation")?;
            p.literal(b",", "`,`")?;
            let mut names = BTreeSet::new();
            p.list(|p| {
                names.insert(p.utf8_string("input derivation output name")?);
                Ok(())
            })?;
            p.literal(b")", "`)` closing an input derivation")?;
            let key = drv.to_string();
            if input_derivations.insert(drv, names).is_some() {
                return Err(duplicate(pos, "input derivation", key));
            }
            Ok(())
        })?;
        self.literal(b",", "`,` after the input derivations")?;
        let mut input_sources = BTreeSet::new();
        self.list(|p| {
            let pos = p.pos;
            let path = p.store_path("input source")?;
            let key = path.to_string();
            if !input_sources.insert(path) {
                return Err(duplicate(pos, "input source", key));
            }
            Ok(())
        })?;
        self.literal(b",", "`,` after the input sources")?;
        let system = self.utf8_string("system")?;
        self.literal(b",", "`,` after the system")?;
        let builder = self.utf8_string("builder")?;
        self.literal(b",", "`,` after the builder")?;
        let mut arguments = Vec::new();
        self.list(|p| {
            arguments.push(p.utf8_string("builder argument")?);
            Ok(())
        })?;
        self.literal(b",", "`,` after the arguments")?;
        let mut environment = BTreeMap::new();
        self.list(|p| {
            let pos = p.pos;
            p.literal(b"(", "`(` opening an environment variable")?;
            let key = p.utf8_string("environment variable name")?;
            p.literal(b",", "`,`")?;
            let value = p.string()?;
            p.literal(b")", "`)` closing an environment variable")?;
            insert_unique(&mut environment, key, value, pos, "environment variable")
        })?;
        self.literal(b")", "`)` closing `Derive(`")?;
        Ok(Derivation {
            outputs,
            input_derivations,
            input_sources,
            system,
            builder,
            arguments,
            environment,
        })
    }

    /// `[item,item,…]`, calling `item` for each element.
    fn list(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<(), DerivationError>,
    ) -> Result<(), DerivationError> {
        self.literal(b"[", "`[` opening a list")?;
        if self.eat(b']') {
            return Ok(());
        }
        loop {
            item(self)?;
            if self.eat(b']') {
                return Ok(());
            }
            self.literal(b",", "`,` or `]` in a list")?;
        }
    }

    /// A quoted string with escapes resolved.
    fn string(&mut self) -> Result<Vec<u8>, DerivationError> {
        self.literal(b"\"", "`\"` opening a string")?;
        let mut out = Vec::new();
        loop {
            let Some(&b) = self.input.get(self.pos) else {
                return Err(self.syntax("`\"` closing a string"));
            };
            self.pos += 1;
            match b {
                b'"' => return Ok(out),
                b'\\' => {
                    let escaped = match self.input.get(self.pos) {
                        Some(b'"') => b'"',
                        Some(b'\\') => b'\\',
                        Some(b'n') => b'\n',
                        Some(b'r') => b'\r',
                        Some(b't') => b'\t',
                        Some(_) => {
                            return Err(DerivationError::Escape {
                                pos: self.pos - 1,
                                found: self.describe(),
                            })
                        }
                        None => return Err(self.syntax("an escaped character")),
                    };
                    self.pos += 1;
                    out.push(escaped);
                }
                _ => out.push(b),
            }
        }
    }

    fn utf8_string(&mut self, what: &'static str) -> Result<String, DerivationError> {
        let pos = self.pos;
        let bytes = self.string()?;
        String::from_utf8(bytes).map_err(|_| DerivationError::NotUtf8 { pos, what })
    }

    fn store_path(&mut self, what: &'static str) -> Result<StorePath, DerivationError> {
        let pos = self.pos;
        let s = self.utf8_string(what)?;
        store_path(&s, pos, what)
    }

    fn literal(&mut self, lit: &[u8], expected: &'static str) -> Result<(), DerivationError> {
        if self
            .input
            .get(self.pos..)
            .is_some_and(|rest| rest.starts_with(lit))
        {
            self.pos += lit.len();
            Ok(())
        } else {
            Err(self.syntax(expected))
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        let found = self.input.get(self.pos) == Some(&b);
        if found {
            self.pos += 1;
        }
        found
    }

    fn syntax(&self, expected: &'static str) -> DerivationError {
        DerivationError::Syntax {
            pos: self.pos,
            expected,
            found: self.describe(),
        }
    }

    /// What is at the cursor, for error messages.
    fn describe(&self) -> String {
        match self.input.get(self.pos) {
            None => "end of input".to_owned(),
            Some(b) if b.is_ascii_graphic() || *b == b' ' => format!("`{}`", char::from(*b)),
            Some(b) => format!("byte 0x{b:02x}"),
        }
    }
}

fn store_path(s: &str, pos: usize, what: &'static str) -> Result<StorePath, DerivationError> {
    StorePath::from_absolute_path(s).map_err(|source| DerivationError::StorePath {
        pos,
        what,
        source,
    })
}

fn insert_unique<V>(
    map: &mut BTreeMap<String, V>,
    key: String,
    value: V,
    pos: usize,
    what: &'static str,
) -> Result<(), DerivationError> {
    if map.contains_key(&key) {
        return Err(duplicate(pos, what, key));
    }
    map.insert(key, value);
    Ok(())
}

fn duplicate(pos: usize, what: &'static str, key: String) -> DerivationError {
    DerivationError::Duplicate { pos, what, key }
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
