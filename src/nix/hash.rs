//! Hashes the way Nix names, writes and reads them: the algorithms a
//! fixed-output derivation may declare ([`HashAlgorithm`]), a digest tagged
//! with its algorithm ([`Hash`]), and a streaming [`Hasher`] for each.
//!
//! Nix writes a digest in one of four forms:
//!
//! | form      | example (sha256 of `fixed\n`)                          |
//! |-----------|---------------------------------------------------------|
//! | base16    | `0c3071418e6356e6…52ecdae534` (what a `.drv` holds)     |
//! | nixbase32 | `0d75vbn546fz9d9ip0f03daqhpm99h3fv14ci4afcmk3ir0p2c0c`  |
//! | base64    | `DDBxQY5jVuYUiYyE7QZMqV6IVRvAgRtTS98ZUuza5TQ=`          |
//! | SRI       | `sha256-DDBxQY5jVuYUiYyE7QZMqV6IVRvAgRtTS98ZUuza5TQ=`   |
//!
//! Without a prefix the form follows from the length, which differs between
//! the three for every algorithm (`2n`, `ceil(8n/5)` and `4 ceil(n/3)`
//! characters for `n` bytes). Nix also reads `<algorithm>:<any form>`, so
//! [`Hash::parse`] does too. Nix prints hashes in SRI form in its errors;
//! so does [`Hash`]'s `Display`.

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod vectors;

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use sha2::Digest;

use super::nixbase32;

/// A hash algorithm Nix accepts in `outputHashAlgo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlgorithm {
    /// MD5, 16 bytes.
    Md5,
    /// SHA-1, 20 bytes.
    Sha1,
    /// SHA-256, 32 bytes; what Nix's store uses for NAR hashes.
    Sha256,
    /// SHA-512, 64 bytes.
    Sha512,
}

impl HashAlgorithm {
    /// Every algorithm, in Nix's order.
    pub const ALL: [HashAlgorithm; 4] = [Self::Md5, Self::Sha1, Self::Sha256, Self::Sha512];

    /// The name Nix uses (`md5`, `sha1`, `sha256`, `sha512`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Md5 => "md5",
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn size(self) -> usize {
        match self {
            Self::Md5 => 16,
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha512 => 64,
        }
    }

    /// Length of a digest in base16.
    pub fn base16_len(self) -> usize {
        2 * self.size()
    }

    /// Length of a digest in nixbase32.
    pub fn nixbase32_len(self) -> usize {
        nixbase32::encoded_len(self.size())
    }

    /// Length of a digest in padded base64.
    pub fn base64_len(self) -> usize {
        4 * self.size().div_ceil(3)
    }
}

impl fmt::Display for HashAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgorithm {
    type Err = HashError;

    fn from_str(name: &str) -> Result<Self, HashError> {
        Self::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| HashError::UnknownAlgorithm(name.to_owned()))
    }
}

/// A digest and the algorithm that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hash {
    /// An MD5 digest.
    Md5([u8; 16]),
    /// A SHA-1 digest.
    Sha1([u8; 20]),
    /// A SHA-256 digest.
    Sha256([u8; 32]),
    /// A SHA-512 digest.
    Sha512([u8; 64]),
}

impl Hash {
    /// The `algorithm` digest `bytes`; `None` if the length is wrong.
    pub fn from_digest(algorithm: HashAlgorithm, bytes: &[u8]) -> Option<Hash> {
        Some(match algorithm {
            HashAlgorithm::Md5 => Hash::Md5(bytes.try_into().ok()?),
            HashAlgorithm::Sha1 => Hash::Sha1(bytes.try_into().ok()?),
            HashAlgorithm::Sha256 => Hash::Sha256(bytes.try_into().ok()?),
            HashAlgorithm::Sha512 => Hash::Sha512(bytes.try_into().ok()?),
        })
    }

    /// Reads an `algorithm` hash in any form Nix reads: base16 (either
    /// case), nixbase32 or base64 told apart by length, SRI
    /// (`<algorithm>-<base64>`), or any of the first three after
    /// `<algorithm>:`. A named algorithm must be `algorithm`.
    pub fn parse(s: &str, algorithm: HashAlgorithm) -> Result<Hash, HashError> {
        // Nix looks for `:` first; neither separator occurs in an encoding.
        if let Some((name, rest)) = s.split_once(':') {
            expect_algorithm(name, algorithm)?;
            return decode_by_length(rest, algorithm);
        }
        if let Some((name, rest)) = s.split_once('-') {
            expect_algorithm(name, algorithm)?;
            if rest.len() != algorithm.base64_len() {
                return Err(HashError::SriLength {
                    algorithm,
                    len: rest.len(),
                });
            }
            return decode_by_length(rest, algorithm);
        }
        decode_by_length(s, algorithm)
    }

    /// The algorithm.
    pub fn algorithm(&self) -> HashAlgorithm {
        match self {
            Hash::Md5(_) => HashAlgorithm::Md5,
            Hash::Sha1(_) => HashAlgorithm::Sha1,
            Hash::Sha256(_) => HashAlgorithm::Sha256,
            Hash::Sha512(_) => HashAlgorithm::Sha512,
        }
    }

    /// The digest bytes.
    pub fn digest(&self) -> &[u8] {
        match self {
            Hash::Md5(d) => d,
            Hash::Sha1(d) => d,
            Hash::Sha256(d) => d,
            Hash::Sha512(d) => d,
        }
    }

    /// Lowercase base16, as a `.drv` holds it and `sha256sum` prints it.
    pub fn to_base16(&self) -> String {
        hex::encode(self.digest())
    }

    /// nixbase32, as `nix-hash --base32` prints it.
    pub fn to_nixbase32(&self) -> String {
        nixbase32::encode(self.digest())
    }

    /// Padded standard base64.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.digest())
    }

    /// `<algorithm>-<base64>`, as `nix hash to-sri` and Nix's errors print it.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algorithm(), self.to_base64())
    }
}

/// SRI form, as Nix prints hashes in its messages.
impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_sri())
    }
}

/// Why a string is not a hash of the expected algorithm.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HashError {
    /// An algorithm name Nix does not know.
    #[error("unknown hash algorithm {0:?} (Nix knows md5, sha1, sha256 and sha512)")]
    UnknownAlgorithm(String),
    /// The hash names an algorithm other than the one declared.
    #[error("the hash is prefixed with {found}, the algorithm is {expected}")]
    OtherAlgorithm {
        /// The declared algorithm.
        expected: HashAlgorithm,
        /// The one the prefix names.
        found: HashAlgorithm,
    },
    /// The length fits none of the three encodings.
    #[error(
        "{len} characters; a {algorithm} hash has {} (base16), {} (nixbase32) or {} (base64)",
        algorithm.base16_len(),
        algorithm.nixbase32_len(),
        algorithm.base64_len()
    )]
    Length {
        /// The algorithm.
        algorithm: HashAlgorithm,
        /// The length found.
        len: usize,
    },
    /// The base64 part of an SRI hash has the wrong length.
    #[error(
        "the base64 part of an SRI {algorithm} hash has {} characters, this one {len}",
        algorithm.base64_len()
    )]
    SriLength {
        /// The algorithm.
        algorithm: HashAlgorithm,
        /// The length found.
        len: usize,
    },
    /// Decodes to a digest of the wrong length.
    #[error("decodes to {bytes} bytes, a {algorithm} digest has {}", algorithm.size())]
    DecodedLength {
        /// The algorithm.
        algorithm: HashAlgorithm,
        /// Bytes decoded.
        bytes: usize,
    },
    /// Of base16 length, but not base16.
    #[error("not base16")]
    Base16(#[source] hex::FromHexError),
    /// Of nixbase32 length, but not nixbase32.
    #[error("not nixbase32")]
    Nixbase32(#[source] nixbase32::DecodeError),
    /// Of base64 length, but not canonical padded base64.
    #[error("not base64")]
    Base64(#[source] base64::DecodeError),
}

fn expect_algorithm(name: &str, expected: HashAlgorithm) -> Result<(), HashError> {
    let found: HashAlgorithm = name.parse()?;
    if found != expected {
        return Err(HashError::OtherAlgorithm { expected, found });
    }
    Ok(())
}

fn decode_by_length(s: &str, algorithm: HashAlgorithm) -> Result<Hash, HashError> {
    let len = s.len();
    let bytes = if len == algorithm.base16_len() {
        hex::decode(s).map_err(HashError::Base16)?
    } else if len == algorithm.nixbase32_len() {
        nixbase32::decode(s).map_err(HashError::Nixbase32)?
    } else if len == algorithm.base64_len() {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(HashError::Base64)?
    } else {
        return Err(HashError::Length { algorithm, len });
    };
    // base16 and nixbase32 of these lengths decode to `size` bytes; base64
    // can hide fewer behind extra padding (`==` where `=` belongs).
    Hash::from_digest(algorithm, &bytes).ok_or(HashError::DecodedLength {
        algorithm,
        bytes: bytes.len(),
    })
}

/// A hash being computed over bytes fed in pieces.
#[derive(Debug, Clone)]
pub struct Hasher(State);

#[derive(Debug, Clone)]
enum State {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// A hasher for `algorithm` that has seen nothing.
    pub fn new(algorithm: HashAlgorithm) -> Self {
        Self(match algorithm {
            HashAlgorithm::Md5 => State::Md5(md5::Md5::new()),
            HashAlgorithm::Sha1 => State::Sha1(sha1::Sha1::new()),
            HashAlgorithm::Sha256 => State::Sha256(sha2::Sha256::new()),
            HashAlgorithm::Sha512 => State::Sha512(sha2::Sha512::new()),
        })
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.0 {
            State::Md5(h) => h.update(data),
            State::Sha1(h) => h.update(data),
            State::Sha256(h) => h.update(data),
            State::Sha512(h) => h.update(data),
        }
    }

    /// The hash of everything fed so far.
    pub fn finish(self) -> Hash {
        match self.0 {
            State::Md5(h) => Hash::Md5(h.finalize().into()),
            State::Sha1(h) => Hash::Sha1(h.finalize().into()),
            State::Sha256(h) => Hash::Sha256(h.finalize().into()),
            State::Sha512(h) => Hash::Sha512(h.finalize().into()),
        }
    }
}
