//! [`B3Digest`]: a BLAKE3-256 digest, exactly 32 bytes.
//!
//! Shown and parsed as 64 lowercase hex digits (parsing also accepts
//! uppercase).

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

use super::errors::{ValidationError, Violation};

/// Length of a BLAKE3-256 digest in bytes.
pub const DIGEST_LEN: usize = 32;

/// A BLAKE3-256 digest: of a blob's bytes, or of a directory's canonical
/// protobuf encoding.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct B3Digest([u8; DIGEST_LEN]);

impl B3Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        blake3::hash(data).into()
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; DIGEST_LEN] {
        &self.0
    }

    /// The raw bytes as [`Bytes`], the way protobuf messages carry them.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(&self.0)
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        // Not through `Display`, which formats byte by byte: the embedded
        // store spells one of these for every blob it names.
        hex::encode(self.0)
    }
}

impl From<blake3::Hash> for B3Digest {
    fn from(hash: blake3::Hash) -> Self {
        B3Digest(*hash.as_bytes())
    }
}

impl From<[u8; DIGEST_LEN]> for B3Digest {
    fn from(bytes: [u8; DIGEST_LEN]) -> Self {
        B3Digest(bytes)
    }
}

impl TryFrom<&[u8]> for B3Digest {
    type Error = ValidationError;

    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        let array: [u8; DIGEST_LEN] = bytes
            .try_into()
            .map_err(|_| ValidationError::new(Violation::DigestLength(bytes.len())))?;
        Ok(B3Digest(array))
    }
}

impl TryFrom<&Bytes> for B3Digest {
    type Error = ValidationError;

    fn try_from(bytes: &Bytes) -> Result<Self, Self::Error> {
        B3Digest::try_from(bytes.as_ref())
    }
}

impl FromStr for B3Digest {
    type Err = ValidationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ValidationError::new(Violation::DigestHex(text.to_owned()));
        if text.len() != 2 * DIGEST_LEN {
            return Err(bad());
        }
        let mut out = [0u8; DIGEST_LEN];
        for (byte, pair) in out.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
            let high = hex_value(pair[0]).ok_or_else(bad)?;
            let low = hex_value(pair[1]).ok_or_else(bad)?;
            *byte = (high << 4) | low;
        }
        Ok(B3Digest(out))
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for B3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for B3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b3:{self}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_is_lowercase() {
        let digest = B3Digest::of(b"kiln");
        let hex = digest.to_string();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, hex.to_lowercase());
        assert_eq!(hex.parse::<B3Digest>(), Ok(digest));
        assert_eq!(hex.to_uppercase().parse::<B3Digest>(), Ok(digest));
    }

    #[test]
    fn empty_blob_vector() {
        assert_eq!(
            B3Digest::of(b"").to_string(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn wrong_lengths_are_named() {
        let err = B3Digest::try_from(&[0u8; 31][..]).unwrap_err();
        assert_eq!(err.to_string(), "value: 31 bytes, want 32");
        let err = B3Digest::try_from(&[0u8; 33][..]).unwrap_err();
        assert_eq!(err.violation, Violation::DigestLength(33));
        assert!(B3Digest::try_from(&[][..]).is_err());
    }

    #[test]
    fn bad_hex_is_refused() {
        assert!("af13".parse::<B3Digest>().is_err());
        let not_hex = "g".repeat(64);
        assert_eq!(
            not_hex.parse::<B3Digest>().unwrap_err().violation,
            Violation::DigestHex(not_hex)
        );
    }
}
