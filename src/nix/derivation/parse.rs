//! The ATerm reader: a cursor over the bytes of a `.drv` file that either
//! advances past what it recognised or stops with a [`DerivationError`]
//! naming the byte offset and what the grammar expected there.

use std::collections::{BTreeMap, BTreeSet};

use super::{Derivation, DerivationError, Output};
use crate::nix::store_path::StorePath;

/// Parses a whole derivation: `input` must end after its closing `)`.
pub(super) fn derivation(input: &[u8]) -> Result<Derivation, DerivationError> {
    let mut p = Parser { input, pos: 0 };
    let drv = p.derivation()?;
    if p.pos != input.len() {
        return Err(p.syntax("end of input after the closing `)`"));
    }
    Ok(drv)
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
