//! The checkpoint: the highest seq committed in PostgreSQL, kept in a small
//! file so that a restart does not replay what is already stored.
//!
//! Written the crash-safe way: a temporary file is written and fsync'd, then
//! renamed over the old one, then the directory is fsync'd. A reader sees the
//! old checkpoint or the new one, never a mix. Format (20 bytes): the magic
//! `ingckpt1`, the seq (u64 little-endian), a CRC-32 of both.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use super::Seq;
use super::segment::sync_dir;

pub const FILE_NAME: &str = "checkpoint";
pub const TEMP_NAME: &str = "checkpoint.tmp";
const MAGIC: &[u8; 8] = b"ingckpt1";
const BYTES: usize = 20;

fn encode(seq: Seq) -> [u8; BYTES] {
    let mut out = [0u8; BYTES];
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&out[..16]);
    out[16..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The seq in checkpoint bytes, or `None` if they are not a valid checkpoint.
fn decode(bytes: &[u8]) -> Option<Seq> {
    if bytes.len() != BYTES || &bytes[..8] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(bytes[16..20].try_into().ok()?);
    if crc32fast::hash(&bytes[..16]) != crc {
        return None;
    }
    Some(Seq::from_le_bytes(bytes[8..16].try_into().ok()?))
}

/// What the checkpoint file holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    /// No checkpoint yet: nothing committed.
    Missing,
    Valid(Seq),
    /// The file exists but is not a valid checkpoint (it is only ever
    /// replaced by rename, so this is real damage, not a torn write).
    Corrupt,
}

/// Reads the checkpoint of `dir` and removes a temporary file left by a crash.
pub fn load(dir: &Path) -> io::Result<Loaded> {
    match fs::remove_file(dir.join(TEMP_NAME)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    match fs::read(dir.join(FILE_NAME)) {
        Ok(bytes) => Ok(decode(&bytes).map_or(Loaded::Corrupt, Loaded::Valid)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Loaded::Missing),
        Err(e) => Err(e),
    }
}

/// Durably replaces the checkpoint of `dir` with `seq`.
pub fn store(dir: &Path, seq: Seq) -> io::Result<()> {
    let temp = dir.join(TEMP_NAME);
    let mut file = File::create(&temp)?;
    file.write_all(&encode(seq))?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temp, dir.join(FILE_NAME))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        assert_eq!(decode(&encode(0)), Some(0));
        assert_eq!(decode(&encode(123_456_789)), Some(123_456_789));
        let mut bad = encode(5);
        bad[9] ^= 1;
        assert_eq!(decode(&bad), None);
        assert_eq!(decode(&encode(5)[..19]), None);
    }
}
