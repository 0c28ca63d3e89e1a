//! Just enough HPACK (RFC 7541) to replace one header's value in a client's
//! header blocks without disturbing the decoder that reads them next.
//!
//! [`Rewriter`] walks a header block, mirrors the client's dynamic table
//! (which entries exist, their sizes, whether they are named `:authority`)
//! and copies every representation unchanged, except the value of an
//! `:authority` field that `keep` refuses: that value is replaced by `a`s
//! of the same decoded length, Huffman-coded. The same length keeps every
//! table entry the size the client computed, so the server's table evicts
//! exactly what the client's does and later indices still line up; the
//! replacement is never longer on the wire (`a` has the shortest Huffman
//! code, 5 bits), so a rewritten block always fits the frames it came in.

use std::collections::VecDeque;
use std::sync::OnceLock;

/// Why a header block could not be walked (the block is then passed on
/// unchanged and the server's own decoder reports it).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    /// The block ends inside a representation.
    #[error("header block ends inside a field")]
    Truncated,
    /// An integer does not fit.
    #[error("integer too large in header block")]
    Overflow,
    /// An index names no table entry.
    #[error("header table index {0} does not exist")]
    Index(usize),
    /// A Huffman-coded string is malformed.
    #[error("malformed Huffman-coded string")]
    Huffman,
}

/// The static table's names (RFC 7541 Appendix A), index 1 first.
const STATIC_NAMES: [&str; 61] = [
    ":authority",
    ":method",
    ":method",
    ":path",
    ":path",
    ":scheme",
    ":scheme",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "accept",
    "access-control-allow-origin",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-range",
    "content-type",
    "cookie",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "link",
    "location",
    "max-forwards",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "refresh",
    "retry-after",
    "server",
    "set-cookie",
    "strict-transport-security",
    "transfer-encoding",
    "user-agent",
    "vary",
    "via",
    "www-authenticate",
];

/// Huffman code length of each symbol, 0..=255 and EOS (RFC 7541
/// Appendix B). The code is canonical, so the lengths define it.
const HUFFMAN_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

/// The symbol the replacement value is made of: its code is 5 bits, the
/// shortest there is.
const FILLER: u8 = b'a';

/// One dynamic table entry, as far as rewriting needs it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    authority: bool,
    name_len: usize,
    size: usize,
}

/// The mirror of one connection's client-to-server HPACK state.
#[derive(Debug)]
pub struct Rewriter {
    table: VecDeque<Entry>,
    size: usize,
    max_size: usize,
}

impl Rewriter {
    /// A fresh connection whose table may hold `max_size` octets (the
    /// server's SETTINGS_HEADER_TABLE_SIZE; 4096 by default).
    pub fn new(max_size: usize) -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size,
        }
    }

    /// `block` with every `:authority` value that `keep` refuses replaced
    /// (see the module docs). The table is updated either way.
    pub fn rewrite(
        &mut self,
        block: &[u8],
        keep: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<u8>, HpackError> {
        let mut out = Vec::with_capacity(block.len());
        let mut at = 0;
        while at < block.len() {
            let first = block[at];
            if first & 0x80 != 0 {
                let (index, used) = integer(&block[at..], 7)?;
                self.name(index)?;
                out.extend_from_slice(&block[at..at + used]);
                at += used;
            } else if first & 0x40 != 0 {
                at = self.literal(block, at, 6, true, &mut out, &keep)?;
            } else if first & 0x20 != 0 {
                let (max_size, used) = integer(&block[at..], 5)?;
                self.max_size = max_size;
                self.evict();
                out.extend_from_slice(&block[at..at + used]);
                at += used;
            } else {
                at = self.literal(block, at, 4, false, &mut out, &keep)?;
            }
        }
        Ok(out)
    }

    /// One literal field starting at `at`; returns where the next starts.
    fn literal(
        &mut self,
        block: &[u8],
        at: usize,
        prefix: u8,
        indexed: bool,
        out: &mut Vec<u8>,
        keep: &impl Fn(&[u8]) -> bool,
    ) -> Result<usize, HpackError> {
        let (index, used) = integer(&block[at..], prefix)?;
        let mut next = at + used;
        let (authority, name_len) = if index == 0 {
            let name = string(block, &mut next)?;
            (name == b":authority", name.len())
        } else {
            self.name(index)?
        };
        let value_at = next;
        let value = string(block, &mut next)?;
        out.extend_from_slice(&block[at..value_at]);
        if authority && !value.is_empty() && !keep(&value) {
            let filler = vec![FILLER; value.len()];
            let coded = huffman_encode(&filler);
            out.extend_from_slice(&encode_integer(coded.len(), 7, 0x80));
            out.extend_from_slice(&coded);
        } else {
            out.extend_from_slice(&block[value_at..next]);
        }
        if indexed {
            self.insert(Entry {
                authority,
                name_len,
                size: name_len + value.len() + 32,
            });
        }
        Ok(next)
    }

    /// Whether entry `index` is named `:authority`, and its name's length.
    fn name(&self, index: usize) -> Result<(bool, usize), HpackError> {
        match index {
            0 => Err(HpackError::Index(0)),
            1..=61 => Ok((index == 1, STATIC_NAMES[index - 1].len())),
            _ => self
                .table
                .get(index - 62)
                .map(|e| (e.authority, e.name_len))
                .ok_or(HpackError::Index(index)),
        }
    }

    fn insert(&mut self, entry: Entry) {
        if entry.size > self.max_size {
            // RFC 7541 4.4: an entry larger than the table empties it.
            self.table.clear();
            self.size = 0;
            return;
        }
        self.table.push_front(entry);
        self.size += entry.size;
        self.evict();
    }

    fn evict(&mut self) {
        while self.size > self.max_size {
            match self.table.pop_back() {
                Some(old) => self.size -= old.size,
                None => self.size = 0,
            }
        }
    }
}

/// An HPACK integer with an N-bit prefix at the start of `bytes`, and how
/// many bytes it took.
fn integer(bytes: &[u8], prefix: u8) -> Result<(usize, usize), HpackError> {
    let first = *bytes.first().ok_or(HpackError::Truncated)?;
    let mask = (1usize << prefix) - 1;
    let mut value = usize::from(first) & mask;
    if value < mask {
        return Ok((value, 1));
    }
    let mut shift = 0u32;
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        if shift > 28 {
            return Err(HpackError::Overflow);
        }
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(HpackError::Truncated)
}

/// Encodes `value` with an N-bit prefix, the prefix's other bits `flags`.
fn encode_integer(mut value: usize, prefix: u8, flags: u8) -> Vec<u8> {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        return vec![flags | value as u8];
    }
    let mut out = vec![flags | mask as u8];
    value -= mask;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
    out
}

/// The string literal at `*at` (decoded), advancing `*at` past it.
fn string(block: &[u8], at: &mut usize) -> Result<Vec<u8>, HpackError> {
    let first = *block.get(*at).ok_or(HpackError::Truncated)?;
    let (len, used) = integer(&block[*at..], 7)?;
    let start = *at + used;
    let end = start.checked_add(len).ok_or(HpackError::Overflow)?;
    let bytes = block.get(start..end).ok_or(HpackError::Truncated)?;
    *at = end;
    if first & 0x80 != 0 {
        huffman_decode(bytes)
    } else {
        Ok(bytes.to_vec())
    }
}

/// The canonical code, built once from [`HUFFMAN_LENGTHS`].
struct Code {
    /// Code of each symbol.
    codes: [u32; 257],
    /// Per length: the first code, the index of its symbol in `sorted`, and
    /// how many codes have that length.
    first: [(u32, usize, usize); 31],
    /// Symbols ordered by (length, symbol).
    sorted: Vec<u16>,
}

fn code() -> &'static Code {
    static CODE: OnceLock<Code> = OnceLock::new();
    CODE.get_or_init(|| {
        let mut sorted: Vec<u16> = (0..257).collect();
        sorted.sort_by_key(|&s| (HUFFMAN_LENGTHS[usize::from(s)], s));
        let mut codes = [0u32; 257];
        let mut first = [(0u32, 0usize, 0usize); 31];
        let (mut next, mut len) = (0u32, HUFFMAN_LENGTHS[usize::from(sorted[0])]);
        for (i, &symbol) in sorted.iter().enumerate() {
            let this = HUFFMAN_LENGTHS[usize::from(symbol)];
            next <<= this - len;
            len = this;
            let slot = &mut first[usize::from(len)];
            if slot.2 == 0 {
                *slot = (next, i, 0);
            }
            slot.2 += 1;
            codes[usize::from(symbol)] = next;
            next += 1;
        }
        Code {
            codes,
            first,
            sorted,
        }
    })
}

/// Decodes a Huffman-coded string (RFC 7541 5.2).
fn huffman_decode(bytes: &[u8]) -> Result<Vec<u8>, HpackError> {
    let code = code();
    let mut out = Vec::with_capacity(bytes.len() * 8 / 5);
    let (mut value, mut len) = (0u32, 0usize);
    for byte in bytes {
        for bit in (0..8).rev() {
            value = (value << 1) | u32::from((byte >> bit) & 1);
            len += 1;
            if len > 30 {
                return Err(HpackError::Huffman);
            }
            let (first, index, count) = code.first[len];
            if count > 0 && value >= first && ((value - first) as usize) < count {
                match code.sorted[index + (value - first) as usize] {
                    256 => return Err(HpackError::Huffman), // EOS must not appear
                    symbol => out.push(symbol as u8),
                }
                (value, len) = (0, 0);
            }
        }
    }
    // Padding: fewer than 8 bits, all ones (a prefix of EOS).
    if len >= 8 || value != (1u32 << len) - 1 {
        return Err(HpackError::Huffman);
    }
    Ok(out)
}

/// Huffman-codes `bytes` (RFC 7541 5.2), padded with ones.
fn huffman_encode(bytes: &[u8]) -> Vec<u8> {
    let code = code();
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u64, 0u32);
    for &b in bytes {
        let len = u32::from(HUFFMAN_LENGTHS[usize::from(b)]);
        acc = (acc << len) | u64::from(code.codes[usize::from(b)]);
        bits += len;
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
        acc &= (1u64 << bits) - 1;
    }
    if bits > 0 {
        let pad = 8 - bits;
        out.push(((acc << pad) | ((1u64 << pad) - 1)) as u8);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).unwrap()
    }

    #[test]
    fn huffman_matches_rfc_7541_appendix_c4() {
        for (text, coded) in [
            ("www.example.com", "f1e3 c2e5 f23a 6ba0 ab90 f4ff"),
            ("no-cache", "a8eb 1064 9cbf"),
            ("custom-key", "25a8 49e9 5ba9 7d7f"),
            ("custom-value", "25a8 49e9 5bb8 e8b4 bf"),
        ] {
            assert_eq!(huffman_encode(text.as_bytes()), hex(coded), "{text}");
            assert_eq!(huffman_decode(&hex(coded)).unwrap(), text.as_bytes());
        }
        // Padding longer than 7 bits, or not all ones, is refused.
        assert_eq!(huffman_decode(&[0xff]), Err(HpackError::Huffman));
        assert_eq!(
            huffman_decode(&hex("f1e3 c2e5 f23a 6ba0 ab90 f400")),
            Err(HpackError::Huffman)
        );
    }

    /// RFC 7541 C.3: three requests sharing a dynamic table.
    const C3: [&str; 3] = [
        "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        "8286 84be 5808 6e6f 2d63 6163 6865",
        "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
    ];

    #[test]
    fn blocks_whose_authority_is_kept_pass_unchanged_and_the_table_follows() {
        let mut rewriter = Rewriter::new(4096);
        for block in C3 {
            let block = hex(block);
            assert_eq!(rewriter.rewrite(&block, |_| true).unwrap(), block);
        }
        // RFC 7541 C.3.3: the table holds 164 octets in three entries.
        assert_eq!((rewriter.size, rewriter.table.len()), (164, 3));
    }

    #[test]
    fn a_refused_authority_becomes_as_many_huffman_coded_as() {
        let mut rewriter = Rewriter::new(4096);
        let first = rewriter.rewrite(&hex(C3[0]), |_| false).unwrap();
        let filler = huffman_encode(&[b'a'; 15]);
        let mut expected = hex("8286 8441");
        expected.push(0x80 | filler.len() as u8);
        expected.extend_from_slice(&filler);
        assert_eq!(first, expected);
        assert!(first.len() < hex(C3[0]).len());
        // Same sizes as the client's table: the later blocks still index
        // the right entries and nothing else changes.
        for block in &C3[1..] {
            let block = hex(block);
            assert_eq!(rewriter.rewrite(&block, |_| true).unwrap(), block);
        }
        assert_eq!(rewriter.size, 164);
    }

    #[test]
    fn a_literal_naming_a_dynamic_authority_entry_is_rewritten_too() {
        let mut rewriter = Rewriter::new(4096);
        rewriter.rewrite(&hex(C3[0]), |_| true).unwrap();
        // Literal without indexing, name = index 62 (the :authority entry),
        // raw value "/x".
        let block = [0x0f, 62 - 15, 0x02, b'/', b'x'];
        let out = rewriter.rewrite(&block, |v| v != b"/x").unwrap();
        let filler = huffman_encode(b"aa");
        let mut expected = vec![0x0f, 62 - 15, 0x80 | filler.len() as u8];
        expected.extend_from_slice(&filler);
        assert_eq!(out, expected);
    }

    #[test]
    fn malformed_blocks_are_errors_not_panics() {
        let mut rewriter = Rewriter::new(4096);
        assert_eq!(
            rewriter.rewrite(&[0x80], |_| true),
            Err(HpackError::Index(0))
        );
        assert_eq!(
            rewriter.rewrite(&[0xbe], |_| true),
            Err(HpackError::Index(62))
        );
        assert_eq!(
            rewriter.rewrite(&[0x41, 0x05, b'a'], |_| true),
            Err(HpackError::Truncated)
        );
        assert_eq!(
            rewriter.rewrite(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], |_| true),
            Err(HpackError::Overflow)
        );
    }
}
