//! Output paths as Nix computes them (`hashDerivationModulo`), so that a
//! `.drv` a client put into kiln's store cannot name outputs it does not
//! own: kiln registers what it built under the paths the derivation names,
//! and a derivation claiming another's output path would poison them.
//!
//! - A fixed-output derivation's hash is the SHA-256 of
//!   `fixed:out:<r:?algo>:<hex>:<output path>`.
//! - Any other's is the SHA-256 of its ATerm with every input derivation's
//!   path replaced by that input's hash in hex (inputs mapping to the same
//!   hash merge their output names) and, when masked, its output paths and
//!   the environment variables named like its outputs emptied.
//! - An input-addressed output's path is then
//!   `output:<name>` over that masked hash and `<drv name>[-<output>]`.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use super::Derivation;
use crate::nix::fixed_output::{FixedOutputHash, Method};
use crate::nix::store_path::make::{self, MakePathError};
use crate::nix::store_path::StorePath;

/// Why a derivation's output paths cannot be checked, or are wrong.
#[derive(Debug, thiserror::Error)]
pub enum OutputPathError {
    /// The hash of an input derivation was not given.
    #[error("input derivation '{0}' is not known")]
    MissingInput(StorePath),
    /// A floating content-addressed or impure output (no path in the `.drv`).
    #[error("output '{0}' has no path (content-addressed derivations are not supported)")]
    Floating(String),
    /// A fixed-output derivation must have exactly one output, `out`.
    #[error("a fixed-output derivation must have exactly one output, 'out'")]
    FixedOutputs,
    /// The fixed output's declaration is malformed.
    #[error("output '{output}': {reason}")]
    Declaration {
        /// The output.
        output: String,
        /// What is wrong.
        reason: String,
    },
    /// The path Nix would give an output is not the one the `.drv` names.
    #[error("output '{output}' should be '{expected}', not '{found}'")]
    WrongPath {
        /// The output.
        output: String,
        /// The path computed.
        expected: StorePath,
        /// The path in the `.drv`.
        found: StorePath,
    },
    /// The environment variable named like an output does not hold its path.
    #[error("environment variable '{output}' should be '{expected}'")]
    WrongEnvironment {
        /// The output (and variable) name.
        output: String,
        /// Its path.
        expected: StorePath,
    },
    /// A computed path is not a valid store path.
    #[error(transparent)]
    Make(#[from] MakePathError),
}

impl Derivation {
    /// Nix's `hashDerivationModulo`: `inputs` holds the (unmasked) hash of
    /// every input derivation; `name` is the derivation's name (its `.drv`
    /// path's name without `.drv`).
    pub fn hash_modulo(
        &self,
        name: &str,
        mask_outputs: bool,
        inputs: &BTreeMap<StorePath, [u8; 32]>,
    ) -> Result<[u8; 32], OutputPathError> {
        if let Some(path) = self.fixed_output_path(name)? {
            let out = &self.outputs["out"];
            let declared = self.fixed_declaration(out)?;
            let prefix = match declared.method {
                Method::Recursive => "r:",
                Method::Text => "text:",
                Method::Flat => "",
            };
            let text = format!(
                "fixed:out:{prefix}{}:{}:{}",
                declared.hash.algorithm(),
                declared.hash.to_base16(),
                path.to_absolute_path()
            );
            return Ok(Sha256::digest(text.as_bytes()).into());
        }
        let mut rewritten: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (input, names) in &self.input_derivations {
            let hash = inputs
                .get(input)
                .ok_or_else(|| OutputPathError::MissingInput(input.clone()))?;
            rewritten
                .entry(hex::encode(hash))
                .or_default()
                .extend(names.iter().cloned());
        }
        let mut masked = self.clone();
        masked.input_derivations = BTreeMap::new();
        if mask_outputs {
            for (output, decl) in &mut masked.outputs {
                decl.path = None;
                if let Some(value) = masked.environment.get_mut(output) {
                    value.clear();
                }
            }
        }
        let aterm = masked.to_aterm_with_inputs(&rewritten);
        Ok(Sha256::digest(&aterm).into())
    }

    /// The output paths Nix gives this derivation, by output name.
    pub fn expected_output_paths(
        &self,
        name: &str,
        inputs: &BTreeMap<StorePath, [u8; 32]>,
    ) -> Result<BTreeMap<String, StorePath>, OutputPathError> {
        if let Some(path) = self.fixed_output_path(name)? {
            return Ok(BTreeMap::from([("out".to_owned(), path)]));
        }
        let hash = self.hash_modulo(name, true, inputs)?;
        self.outputs
            .keys()
            .map(|output| {
                let path_name = if output == "out" {
                    name.to_owned()
                } else {
                    format!("{name}-{output}")
                };
                let path = make::make_output_path(output, &hash, &path_name)?;
                Ok((output.clone(), path))
            })
            .collect()
    }

    /// Checks that every output path, and the environment variable named
    /// like each output, is what Nix would compute.
    pub fn check_output_paths(
        &self,
        name: &str,
        inputs: &BTreeMap<StorePath, [u8; 32]>,
    ) -> Result<(), OutputPathError> {
        for (output, decl) in &self.outputs {
            if decl.path.is_none() {
                return Err(OutputPathError::Floating(output.clone()));
            }
        }
        let expected = self.expected_output_paths(name, inputs)?;
        for (output, path) in expected {
            let found = self.outputs[&output].path.as_ref();
            if let Some(found) = found.filter(|f| **f != path) {
                return Err(OutputPathError::WrongPath {
                    found: found.clone(),
                    output,
                    expected: path,
                });
            }
            let env = self.environment.get(&output).map(Vec::as_slice);
            if env != Some(path.to_absolute_path().as_bytes()) {
                return Err(OutputPathError::WrongEnvironment {
                    output,
                    expected: path,
                });
            }
        }
        Ok(())
    }

    /// The output path of a fixed-output derivation; `None` for others.
    fn fixed_output_path(&self, name: &str) -> Result<Option<StorePath>, OutputPathError> {
        if !self.is_fixed_output() {
            return Ok(None);
        }
        let (Some(out), 1) = (self.outputs.get("out"), self.outputs.len()) else {
            return Err(OutputPathError::FixedOutputs);
        };
        let declared = self.fixed_declaration(out)?;
        let none = BTreeSet::new();
        let path = match declared.method {
            Method::Text => match declared.hash {
                crate::nix::hash::Hash::Sha256(d) => make::make_text_path(name, &d, &none)?,
                _ => return Err(OutputPathError::FixedOutputs),
            },
            Method::Flat | Method::Recursive => {
                let method = if declared.method == Method::Flat {
                    make::Method::Flat
                } else {
                    make::Method::Recursive
                };
                make::make_fixed_output_path(name, method, &declared.hash, &none, false)?
            }
        };
        Ok(Some(path))
    }

    fn fixed_declaration(&self, out: &super::Output) -> Result<FixedOutputHash, OutputPathError> {
        FixedOutputHash::of(out).map_err(|e| OutputPathError::Declaration {
            output: "out".to_owned(),
            reason: crate::nix::daemon::error_chain(&e),
        })
    }
}

#[cfg(test)]
#[path = "modulo_tests.rs"]
mod tests;
