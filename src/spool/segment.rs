//! Segment files: naming, creation, listing, and the start-up scan of the
//! last segment that finds where its intact records end.
//!
//! A segment is `{first_seq:020}.seg`: a 16-byte magic header, then records
//! with consecutive seqs starting at `first_seq`. Zero-padded names sort in
//! seq order, and the name alone says which seqs a sealed segment holds (up
//! to the next segment's first seq), so deciding what to delete needs no read.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::Seq;
use super::record::{self, Damage, Next, RECORD_HEADER_BYTES};

/// First bytes of every segment: a format check, and a version.
pub const MAGIC: &[u8; 16] = b"ingestd spool 1\n";

/// Bytes of a segment before its first record.
pub const SEGMENT_HEADER_BYTES: u64 = MAGIC.len() as u64;

pub fn file_name(first_seq: Seq) -> String {
    format!("{first_seq:020}.seg")
}

/// The first seq of a segment file name, or `None` for other files.
pub fn parse_name(name: &str) -> Option<Seq> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A segment on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub first_seq: Seq,
    pub path: PathBuf,
    pub bytes: u64,
}

/// The segments in `dir`, in seq order.
pub fn list(dir: &Path) -> io::Result<Vec<Listed>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let Some(first_seq) = entry.file_name().to_str().and_then(parse_name) else { continue };
        out.push(Listed { first_seq, path: entry.path(), bytes: entry.metadata()?.len() });
    }
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

/// Creates a new, empty segment and makes it durable (file and directory
/// entry) before any record goes into it. Returns it opened for appending.
pub fn create(dir: &Path, first_seq: Seq) -> io::Result<File> {
    let path = dir.join(file_name(first_seq));
    let mut file = OpenOptions::new().create_new(true).append(true).open(&path)?;
    file.write_all(MAGIC)?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok(file)
}

/// fsyncs a directory, so that entries created, renamed or removed in it last.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Opens a segment for reading and checks its header.
pub fn open_for_read(path: &Path) -> io::Result<Result<BufReader<File>, Damage>> {
    let mut file = BufReader::with_capacity(256 * 1024, File::open(path)?);
    let mut magic = [0u8; MAGIC.len()];
    match file.read_exact(&mut magic) {
        Ok(()) if &magic == MAGIC => Ok(Ok(file)),
        Ok(()) => Ok(Err(Damage::BadChecksum)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Err(Damage::ShortHeader)),
        Err(e) => Err(e),
    }
}

/// Where the intact part of the last segment ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    /// Whether the segment header itself is whole and right.
    pub header_ok: bool,
    /// Byte offset just past the last intact record (or the header).
    pub valid_bytes: u64,
    /// Seq of the last intact record; `None` when it holds none.
    pub last_seq: Option<Seq>,
    /// The damage found at `valid_bytes`, if the file goes on past it.
    pub damage: Option<Damage>,
    /// An intact record with the expected seq follows the damaged one: the
    /// damage is in the middle of the log rather than a torn tail.
    pub intact_after: bool,
}

/// Reads the whole last segment, checking every record's checksum and seq.
pub fn scan_tail(path: &Path, first_seq: Seq, max_payload_bytes: u64) -> io::Result<Tail> {
    let mut r = match open_for_read(path)? {
        Ok(r) => r,
        Err(damage) => {
            return Ok(Tail {
                header_ok: false,
                valid_bytes: 0,
                last_seq: None,
                damage: Some(damage),
                intact_after: false,
            });
        }
    };
    let mut offset = SEGMENT_HEADER_BYTES;
    let mut expected = first_seq;
    let mut buf = Vec::new();
    let (damage, len) = loop {
        match record::read(&mut r, max_payload_bytes, &mut buf)? {
            Next::End => {
                let last_seq = (expected > first_seq).then(|| expected - 1);
                return Ok(Tail { header_ok: true, valid_bytes: offset, last_seq, damage: None, intact_after: false });
            }
            Next::Record { seq, bytes } if seq == expected => {
                offset += bytes;
                expected += 1;
            }
            Next::Record { bytes, .. } => break (Damage::WrongSeq, Some((bytes - RECORD_HEADER_BYTES as u64) as u32)),
            Next::Damaged { damage, len } => break (damage, len),
        }
    };
    // Look one record past the damage: if the header's length was plausible
    // and a good record with the next seq sits right after, this is not a
    // torn write at the end but damage inside the log.
    let intact_after = match len {
        Some(len) => {
            let mut r = r.into_inner();
            r.seek(SeekFrom::Start(offset + RECORD_HEADER_BYTES as u64 + u64::from(len)))?;
            let mut r = BufReader::new(r);
            matches!(record::read(&mut r, max_payload_bytes, &mut buf)?, Next::Record { seq, .. } if seq == expected + 1)
        }
        None => false,
    };
    let last_seq = (expected > first_seq).then(|| expected - 1);
    Ok(Tail { header_ok: true, valid_bytes: offset, last_seq, damage: Some(damage), intact_after })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_in_seq_order_and_parse_back() {
        assert_eq!(file_name(42), "00000000000000000042.seg");
        assert_eq!(parse_name(&file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_name("checkpoint"), None);
        assert_eq!(parse_name("42.seg"), None);
        assert_eq!(parse_name("0000000000000000004x.seg"), None);
        assert!(file_name(9) < file_name(10));
    }
}
