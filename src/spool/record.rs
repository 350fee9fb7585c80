//! Record framing: pure encoding and a reader that tells a clean end from a
//! torn or corrupt record.
//!
//! ```text
//! offset  bytes  field
//!      0      4  payload length, u32 little-endian
//!      4      8  seq, u64 little-endian
//!     12      4  CRC-32 (IEEE) of bytes 0..12 and the payload, little-endian
//!     16    len  payload
//! ```
//!
//! The checksum covers the length and the seq as well as the payload, so a
//! flipped bit anywhere in a record is caught, and a corrupt length cannot
//! send the reader off into the middle of another record unnoticed. The
//! length is also bounded by the largest record a segment can hold, so a
//! garbage header never makes the reader allocate gigabytes.

use std::io::{self, Read};

use super::Seq;

/// Bytes of framing in front of every payload.
pub const RECORD_HEADER_BYTES: usize = 16;

/// Appends one framed record to `out`. `payload` must fit a u32 length
/// (the caller checks against the segment size first).
pub fn encode(out: &mut Vec<u8>, seq: Seq, payload: &[u8]) {
    debug_assert!(u32::try_from(payload.len()).is_ok());
    let start = out.len();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    let crc = checksum(&out[start..start + 12], payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
}

fn checksum(head: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(payload);
    h.finalize()
}

/// Why the bytes at a position are not a whole, intact record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// Fewer than 16 bytes before the end of the file.
    ShortHeader,
    /// A length beyond what a segment can hold: garbage.
    BadLength,
    /// The file ends inside the payload.
    ShortPayload,
    /// The checksum does not match.
    BadChecksum,
    /// Intact, but not the seq that must come next.
    WrongSeq,
}

impl Damage {
    pub fn as_str(self) -> &'static str {
        match self {
            Damage::ShortHeader => "short record header",
            Damage::BadLength => "record length out of range",
            Damage::ShortPayload => "short record payload",
            Damage::BadChecksum => "record checksum mismatch",
            Damage::WrongSeq => "record out of sequence",
        }
    }
}

/// What [`read`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// An intact record; its payload is in the buffer. `bytes` includes framing.
    Record { seq: Seq, bytes: u64 },
    /// A clean end of file, exactly at a record boundary.
    End,
    /// Damaged bytes. `len` is the length field when the header was whole
    /// (to look past the damage), else `None`.
    Damaged { damage: Damage, len: Option<u32> },
}

/// Reads one record into `payload` (resized to fit). I/O errors other than a
/// short read are returned as errors: they say nothing about the data.
pub fn read(r: &mut impl Read, max_payload_bytes: u64, payload: &mut Vec<u8>) -> io::Result<Next> {
    let mut head = [0u8; RECORD_HEADER_BYTES];
    match read_full(r, &mut head)? {
        0 => return Ok(Next::End),
        RECORD_HEADER_BYTES => {}
        _ => return Ok(Next::Damaged { damage: Damage::ShortHeader, len: None }),
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&head[4..12]);
    let seq = Seq::from_le_bytes(seq);
    let crc = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
    if u64::from(len) > max_payload_bytes {
        return Ok(Next::Damaged { damage: Damage::BadLength, len: None });
    }
    payload.resize(len as usize, 0);
    if read_full(r, payload)? < payload.len() {
        return Ok(Next::Damaged { damage: Damage::ShortPayload, len: Some(len) });
    }
    if checksum(&head[..12], payload) != crc {
        return Ok(Next::Damaged { damage: Damage::BadChecksum, len: Some(len) });
    }
    Ok(Next::Record { seq, bytes: (RECORD_HEADER_BYTES + len as usize) as u64 })
}

/// Fills `buf` unless the reader ends first; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(seq: Seq, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, seq, payload);
        out
    }

    fn parse(bytes: &[u8]) -> (Next, Vec<u8>) {
        let mut buf = Vec::new();
        let next = read(&mut &bytes[..], 1024, &mut buf).expect("in-memory read");
        (next, buf)
    }

    #[test]
    fn golden_bytes() {
        let bytes = one(7, b"hi");
        assert_eq!(&bytes[..12], &[2, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[16..], b"hi");
        assert_eq!(bytes.len(), RECORD_HEADER_BYTES + 2);
    }

    #[test]
    fn round_trip_and_clean_end() {
        let mut bytes = one(1, b"first");
        bytes.extend(one(2, b""));
        let mut r = &bytes[..];
        let mut buf = Vec::new();
        assert_eq!(read(&mut r, 1024, &mut buf).unwrap(), Next::Record { seq: 1, bytes: 21 });
        assert_eq!(buf, b"first");
        assert_eq!(read(&mut r, 1024, &mut buf).unwrap(), Next::Record { seq: 2, bytes: 16 });
        assert!(buf.is_empty());
        assert_eq!(read(&mut r, 1024, &mut buf).unwrap(), Next::End);
    }

    #[test]
    fn every_kind_of_damage_is_named() {
        let good = one(3, b"payload");
        assert_eq!(parse(&good[..10]).0, Next::Damaged { damage: Damage::ShortHeader, len: None });
        assert_eq!(parse(&good[..20]).0, Next::Damaged { damage: Damage::ShortPayload, len: Some(7) });
        for at in 0..good.len() {
            let mut flipped = good.clone();
            flipped[at] ^= 0x10;
            match parse(&flipped).0 {
                Next::Damaged { .. } => {}
                other => panic!("flip at {at} read as {other:?}"),
            }
        }
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&5000u32.to_le_bytes());
        assert_eq!(parse(&huge).0, Next::Damaged { damage: Damage::BadLength, len: None });
    }
}
