//! Nix's own base-32 encoding ("nixbase32"), used in store path hashes and in
//! the `sha256:<…>` form of NAR hashes.
//!
//! It differs from RFC 4648 base-32 in two ways: the alphabet omits `e`, `o`,
//! `u` and `t` (to avoid accidental words), and the bits are taken from the
//! *end* of the input: the first character encodes the highest five bits of
//! the last byte. There is no padding; `n` bytes give `ceil(8n / 5)`
//! characters.

/// Nix's alphabet, in digit order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a string is not nixbase32.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A character outside [`ALPHABET`].
    #[error("character {found:?} at index {index} is not in the nixbase32 alphabet")]
    InvalidCharacter {
        /// Index of the character in the input.
        index: usize,
        /// The offending character.
        found: char,
    },
    /// The string has bits set beyond the decoded length, so it is not the
    /// encoding of any byte string (every valid encoding round-trips).
    #[error("{len}-character string sets bits beyond its decoded length")]
    NonZeroPadding {
        /// Length of the input.
        len: usize,
    },
    /// No byte string encodes to this length.
    #[error("no byte string encodes to {0} nixbase32 characters")]
    InvalidLength(usize),
}

/// Number of characters [`encode`] produces for `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    (len * 8).div_ceil(5)
}

/// Number of bytes a `len`-character nixbase32 string decodes to.
pub const fn decoded_len(len: usize) -> usize {
    len * 5 / 8
}

/// Encodes `bytes` in nixbase32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    // Character `n` (counted from the end of the output) holds bits
    // `5n .. 5n+5` of the input read as a little-endian number.
    for n in (0..len).rev() {
        let bit = n * 5;
        let (byte, shift) = (bit / 8, bit % 8);
        let low = u16::from(bytes[byte]) >> shift;
        let high = bytes
            .get(byte + 1)
            .map_or(0, |b| u16::from(*b) << (8 - shift));
        out.push(char::from(ALPHABET[usize::from((low | high) & 0x1f)]));
    }
    out
}

/// Decodes a nixbase32 string.
pub fn decode(s: &str) -> Result<Vec<u8>, DecodeError> {
    let len = decoded_len(s.len());
    if encoded_len(len) != s.len() {
        return Err(DecodeError::InvalidLength(s.len()));
    }
    let mut out = vec![0u8; len];
    for (index, c) in s.bytes().enumerate() {
        let digit =
            ALPHABET
                .iter()
                .position(|a| *a == c)
                .ok_or_else(|| DecodeError::InvalidCharacter {
                    index,
                    found: s[index..].chars().next().unwrap_or('\u{fffd}'),
                })?;
        let digit = digit as u16;
        let n = s.len() - 1 - index;
        let bit = n * 5;
        let (byte, shift) = (bit / 8, bit % 8);
        let spread = digit << shift;
        // `byte < len` can fail only for the top character; its excess bits
        // must then be zero.
        match out.get_mut(byte) {
            Some(b) => *b |= (spread & 0xff) as u8,
            None if spread != 0 => return Err(DecodeError::NonZeroPadding { len: s.len() }),
            None => {}
        }
        let carry = (spread >> 8) as u8;
        match out.get_mut(byte + 1) {
            Some(b) => *b |= carry,
            None if carry != 0 => return Err(DecodeError::NonZeroPadding { len: s.len() }),
            None => {}
        }
    }
    Ok(out)
}

/// Decodes a nixbase32 string that must hold exactly `N` bytes.
pub fn decode_fixed<const N: usize>(s: &str) -> Result<[u8; N], DecodeError> {
    if s.len() != encoded_len(N) {
        return Err(DecodeError::InvalidLength(s.len()));
    }
    let bytes = decode(s)?;
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes);
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // sha256("") as `nix-hash --type sha256 --to-base32` prints it.
        let empty = hex::decode("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
            .unwrap();
        assert_eq!(
            encode(&empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0x1f]), "0z");
        assert_eq!(encode(&[0xff]), "7z");
        assert_eq!(decode("7z").unwrap(), vec![0xff]);
    }

    #[test]
    fn round_trips_every_length() {
        for len in 0..64usize {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let s = encode(&bytes);
            assert_eq!(s.len(), encoded_len(len));
            assert_eq!(decode(&s).unwrap(), bytes, "length {len}");
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            decode("0e"),
            Err(DecodeError::InvalidCharacter {
                index: 1,
                found: 'e'
            })
        );
        // 2 characters carry 10 bits for 1 byte: the top two must be zero.
        assert_eq!(decode("8z"), Err(DecodeError::NonZeroPadding { len: 2 }));
        assert_eq!(decode("123"), Err(DecodeError::InvalidLength(3)));
        assert!(decode_fixed::<20>("00").is_err());
        assert!(decode("é0").is_err());
    }
}
