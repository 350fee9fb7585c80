//! The spool against real files: append and replay across reopen, group
//! commit, rollover and deletion, torn tails, damage elsewhere, the
//! checkpoint, the size bound, and a SIGKILL of a child process.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::*;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let unique = format!("ingestd-spool-{name}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(unique);
        let _ = fs::remove_dir_all(&path);
        Self(path)
    }

    fn config(&self, segment_bytes: u64, max_bytes: u64) -> SpoolConfig {
        SpoolConfig { dir: self.0.clone(), segment_bytes, max_bytes, ..SpoolConfig::default() }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A recognisable payload of `len` bytes for record `i`.
fn payload(i: u64, len: usize) -> Vec<u8> {
    let mut p = format!("record-{i}:").into_bytes();
    p.resize(len, b'a' + (i % 26) as u8);
    p
}

/// Opens the spool, retrying `Locked` for a moment: another test in this
/// process may be spawning a child (the SIGKILL test), and between its fork
/// and exec the child holds a copy of every descriptor, our flock included.
fn open(config: &SpoolConfig) -> (Spool, Appender, Recovery) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match Spool::open(config.clone()) {
            Err(SpoolError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            other => return other.expect("open spool"),
        }
    }
}

fn read_all(reader: &mut SpoolReader) -> Vec<Record> {
    let mut out = Vec::new();
    while let Some(r) = reader.next().expect("read") {
        out.push(r);
    }
    out
}

fn seqs(records: &[Record]) -> Vec<Seq> {
    records.iter().map(|r| r.seq).collect()
}

fn segment_files(dir: &Path) -> Vec<Seq> {
    segment::list(dir).expect("list").into_iter().map(|s| s.first_seq).collect()
}

/// Appends `n` records of `len` bytes, seqs `first..first+n`.
fn fill(appender: &mut Appender, first: Seq, n: u64, len: usize) {
    for i in first..first + n {
        assert_eq!(appender.append(&payload(i, len)).expect("append"), i);
    }
}

const BIG: u64 = 1 << 20;

#[test]
fn config_defaults_are_valid_and_problems_are_named() {
    assert!(SpoolConfig::default().problems().is_empty());
    let bad =
        SpoolConfig { dir: PathBuf::new(), segment_bytes: 10, max_bytes: 0, queue_capacity: 0, max_group_bytes: 0 };
    let keys: Vec<_> = bad.problems().into_iter().map(|p| p.0).collect();
    assert_eq!(keys, ["dir", "segment_bytes", "max_bytes", "queue_capacity", "max_group_bytes"]);
    assert!(matches!(Spool::open(bad), Err(SpoolError::Config(_))));
}

#[test]
fn append_reopen_replay() {
    let dir = TempDir::new("reopen");
    let config = dir.config(BIG, 4 * BIG);
    {
        let (spool, mut appender, recovery) = open(&config);
        assert_eq!((recovery.next_seq, recovery.pending_records(), recovery.tail_cut.clone()), (1, 0, None));
        fill(&mut appender, 1, 10, 100);
        assert_eq!(appender.append_batch(&[&b"x"[..], b"", b"z"]).expect("batch"), 11..14);
        assert_eq!(spool.durable_seq(), 13);
        let records = read_all(&mut spool.replay());
        assert_eq!(seqs(&records), (1..=13).collect::<Vec<_>>());
        assert_eq!(records[4].payload, payload(5, 100));
        assert_eq!(records[11].payload, b"");
    }
    let (spool, mut appender, recovery) = open(&config);
    assert_eq!((recovery.committed_seq, recovery.next_seq, recovery.pending_records()), (0, 14, 13));
    assert_eq!(recovery.tail_cut, None);
    let records = read_all(&mut spool.replay());
    assert_eq!(seqs(&records), (1..=13).collect::<Vec<_>>());
    assert_eq!(records[9].payload, payload(10, 100));
    assert_eq!(appender.append(b"after").expect("append"), 14);
    let mut from = spool.reader(12);
    assert_eq!(seqs(&read_all(&mut from)), [12, 13, 14]);
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = TempDir::new("lock");
    let config = dir.config(BIG, 4 * BIG);
    let held = open(&config);
    assert!(matches!(Spool::open(config.clone()), Err(SpoolError::Locked(_))));
    drop(held);
    open(&config);
}

#[test]
fn concurrent_appends_share_fsyncs_and_keep_every_record() {
    let dir = TempDir::new("group");
    let config = dir.config(64 * 1024, 64 * BIG);
    let (spool, appender, _) = open(&config);
    let (sender, thread) = appender.spawn().expect("spawn appender");
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let sender = sender.clone();
            std::thread::spawn(move || {
                (0..50u64)
                    .map(|i| {
                        let p = payload(t * 1000 + i, 300);
                        let seq = sender.try_append(p.clone()).expect("queued").wait_blocking().expect("durable");
                        (seq, p)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut acked: Vec<(Seq, Vec<u8>)> =
        threads.into_iter().flat_map(|t| t.join().expect("appending thread")).collect();
    drop(sender);
    let report = thread.join().expect("appender thread");
    acked.sort();
    assert_eq!(acked.iter().map(|a| a.0).collect::<Vec<_>>(), (1..=400).collect::<Vec<_>>());
    assert_eq!((report.records, report.failed_records), (400, 0));
    assert!(report.groups <= 400);
    assert!(spool.appender_stopped());
    let records = read_all(&mut spool.replay());
    assert_eq!(records.len(), 400);
    for (record, (seq, p)) in records.iter().zip(&acked) {
        assert_eq!((&record.seq, &record.payload), (seq, p));
    }
    assert!(segment_files(&dir.0).len() > 1, "400 × 316 bytes roll 64 KiB segments");
}

#[test]
fn everything_queued_goes_into_one_group() {
    let dir = TempDir::new("onegroup");
    let (spool, appender, _) = open(&dir.config(4096, BIG));
    let (sender, rx) = appender.queue();
    // Records of 500 bytes: the group spans several 4 KiB segments.
    let waits: Vec<_> = (1..=20).map(|i| sender.try_append(payload(i, 500)).expect("queued")).collect();
    drop(sender);
    let report = appender.run(rx);
    assert_eq!(report, AppenderReport { records: 20, groups: 1, failed_records: 0 });
    let got: Vec<Seq> = waits.into_iter().map(|w| w.wait_blocking().expect("durable")).collect();
    assert_eq!(got, (1..=20).collect::<Vec<_>>());
    assert_eq!(spool.stats().append_groups, 1);
    assert_eq!(seqs(&read_all(&mut spool.replay())), (1..=20).collect::<Vec<_>>());
}

#[test]
fn segments_roll_over_and_are_deleted_once_committed() {
    let dir = TempDir::new("roll");
    // 16-byte header + 4 records of 216 bytes = 880; a fifth would pass 1024.
    let config = dir.config(1024, 16 * 1024);
    let (spool, mut appender, _) = open(&config);
    fill(&mut appender, 1, 20, 200);
    assert_eq!(segment_files(&dir.0), [1, 5, 9, 13, 17]);
    let on_disk = |dir: &Path| segment::list(dir).expect("list").iter().map(|s| s.bytes).sum::<u64>();
    assert_eq!(spool.stats().used_bytes, on_disk(&dir.0));

    let done = spool.commit_through(10).expect("commit");
    assert_eq!(done, Committed { deleted_segments: 2, freed_bytes: 2 * 880 });
    assert_eq!(segment_files(&dir.0), [9, 13, 17]);
    assert_eq!(spool.stats().used_bytes, on_disk(&dir.0));
    assert_eq!(seqs(&read_all(&mut spool.replay())), (11..=20).collect::<Vec<_>>());
    assert_eq!(seqs(&read_all(&mut spool.reader(1))), (9..=20).collect::<Vec<_>>(), "oldest kept record on");
    drop((spool, appender));

    let (spool, mut appender, recovery) = open(&config);
    assert_eq!((recovery.committed_seq, recovery.segments, recovery.pending_records()), (10, 3, 10));
    assert_eq!(seqs(&read_all(&mut spool.replay())), (11..=20).collect::<Vec<_>>());
    let done = spool.commit_through(20).expect("commit all");
    assert_eq!(done.deleted_segments, 2, "the segment being appended to stays");
    assert_eq!(segment_files(&dir.0), [17]);
    assert!(read_all(&mut spool.replay()).is_empty());
    assert_eq!(appender.append(b"next").expect("append"), 21);
    assert_eq!(seqs(&read_all(&mut spool.replay())), [21]);
}

#[test]
fn commit_through_rules() {
    let dir = TempDir::new("commit");
    let (spool, mut appender, _) = open(&dir.config(BIG, 4 * BIG));
    fill(&mut appender, 1, 3, 10);
    assert!(matches!(spool.commit_through(4), Err(SpoolError::Ahead { seq: 4, durable_seq: 3 })));
    spool.commit_through(2).expect("commit");
    assert_eq!(spool.commit_through(1).expect("older is a no-op"), Committed::default());
    assert_eq!(spool.committed_seq(), 2);
}

#[test]
fn checkpoint_survives_reopen_and_a_crash_between_checkpoint_and_delete() {
    let dir = TempDir::new("checkpoint");
    let config = dir.config(1024, 16 * 1024);
    {
        let (spool, mut appender, _) = open(&config);
        fill(&mut appender, 1, 12, 200);
        spool.commit_through(3).expect("commit");
    }
    let (spool, appender, recovery) = open(&config);
    assert_eq!(recovery.committed_seq, 3);
    assert_eq!(seqs(&read_all(&mut spool.replay())), (4..=12).collect::<Vec<_>>());
    drop((spool, appender));
    // As if the process died right after storing the checkpoint for 8: the
    // segments it frees are still there, and a temporary file too.
    checkpoint::store(&dir.0, 8).expect("store");
    fs::write(dir.0.join(checkpoint::TEMP_NAME), b"half").expect("write temp");
    assert_eq!(segment_files(&dir.0), [1, 5, 9]);
    let (spool, _appender, recovery) = open(&config);
    assert_eq!((recovery.committed_seq, recovery.deleted_segments), (8, 2));
    assert_eq!(segment_files(&dir.0), [9]);
    assert!(!dir.0.join(checkpoint::TEMP_NAME).exists());
    assert_eq!(seqs(&read_all(&mut spool.replay())), (9..=12).collect::<Vec<_>>());
}

#[test]
fn a_damaged_checkpoint_stops_the_open() {
    let dir = TempDir::new("badckpt");
    let config = dir.config(BIG, 4 * BIG);
    drop(open(&config));
    fs::write(dir.0.join(checkpoint::FILE_NAME), b"not a checkpoint").expect("write");
    assert!(matches!(Spool::open(config), Err(SpoolError::Corrupt { .. })));
}

/// Five records of 100 bytes in one segment, closed; returns the segment path.
fn five_records(config: &SpoolConfig) -> PathBuf {
    let (_, mut appender, _) = open(config);
    fill(&mut appender, 1, 5, 100);
    config.dir.join(segment::file_name(1))
}

/// Reopens after damage: checks the cut, that `survivors` are intact, and
/// that appending carries on and is clean on the next open.
fn reopen_after_damage(config: &SpoolConfig, damage: Damage, survivors: u64) -> TailCut {
    let (spool, mut appender, recovery) = open(config);
    let cut = recovery.tail_cut.clone().expect("a cut");
    assert_eq!(cut.damage, damage);
    assert_eq!(recovery.next_seq, survivors + 1);
    let records = read_all(&mut spool.replay());
    assert_eq!(seqs(&records), (1..=survivors).collect::<Vec<_>>());
    for r in &records {
        assert_eq!(r.payload, payload(r.seq, 100));
    }
    assert_eq!(appender.append(&payload(survivors + 1, 100)).expect("append"), survivors + 1);
    drop((spool, appender));
    let (spool, _, recovery) = open(config);
    assert_eq!(recovery.tail_cut, None, "the cut was made durable");
    assert_eq!(seqs(&read_all(&mut spool.replay())), (1..=survivors + 1).collect::<Vec<_>>());
    cut
}

const RECORD: u64 = 116; // 16 + 100

#[test]
fn a_tail_torn_mid_record_is_cut() {
    let dir = TempDir::new("torn");
    let config = dir.config(BIG, 4 * BIG);
    let path = five_records(&config);
    let len = fs::metadata(&path).expect("stat").len();
    OpenOptions::new().write(true).open(&path).expect("open").set_len(len - 40).expect("truncate");
    let cut = reopen_after_damage(&config, Damage::ShortPayload, 4);
    assert_eq!((cut.offset, cut.bytes_cut, cut.intact_after), (16 + 4 * RECORD, RECORD - 40, false));
}

#[test]
fn a_tail_torn_inside_a_header_is_cut() {
    let dir = TempDir::new("tornhead");
    let config = dir.config(BIG, 4 * BIG);
    let path = five_records(&config);
    let len = fs::metadata(&path).expect("stat").len();
    OpenOptions::new().write(true).open(&path).expect("open").set_len(len - RECORD + 7).expect("truncate");
    reopen_after_damage(&config, Damage::ShortHeader, 4);
}

#[test]
fn garbage_after_the_last_record_is_cut() {
    let dir = TempDir::new("garbage");
    let config = dir.config(BIG, 4 * BIG);
    let path = five_records(&config);
    let mut file = OpenOptions::new().append(true).open(&path).expect("open");
    file.write_all(&[0x5a; 300]).expect("garbage");
    drop(file);
    let cut = reopen_after_damage(&config, Damage::BadLength, 5);
    assert_eq!(cut.bytes_cut, 300);
}

#[test]
fn zeroed_tail_is_cut() {
    // What a crash can leave when the file size reached disk before the data.
    let dir = TempDir::new("zeros");
    let config = dir.config(BIG, 4 * BIG);
    let path = five_records(&config);
    let mut file = OpenOptions::new().append(true).open(&path).expect("open");
    file.write_all(&[0; 4096]).expect("zeros");
    drop(file);
    reopen_after_damage(&config, Damage::BadChecksum, 5);
}

#[test]
fn a_flipped_byte_in_the_last_record_is_cut() {
    let dir = TempDir::new("flip");
    let config = dir.config(BIG, 4 * BIG);
    let path = five_records(&config);
    flip(&path, 16 + 4 * RECORD + 50);
    let cut = reopen_after_damage(&config, Damage::BadChecksum, 4);
    assert!(!cut.intact_after);
}

#[test]
fn a_flipped_byte_mid_segment_is_cut_and_flagged() {
    let dir = TempDir::new("flipmid");
    let config = dir.config(BIG, 4 * BIG);
    let path = five_records(&config);
    flip(&path, 16 + RECORD + 50);
    let cut = reopen_after_damage(&config, Damage::BadChecksum, 1);
    assert!(cut.intact_after, "record 3 was intact after the damaged record 2");
}

#[test]
fn a_segment_torn_while_being_created_is_removed() {
    let dir = TempDir::new("tornseg");
    let config = dir.config(BIG, 4 * BIG);
    five_records(&config);
    fs::write(dir.0.join(segment::file_name(6)), &segment::MAGIC[..5]).expect("write");
    let (spool, mut appender, recovery) = open(&config);
    assert_eq!(recovery.tail_cut.map(|c| c.damage), Some(Damage::ShortHeader));
    assert_eq!(appender.append(b"six").expect("append"), 6);
    assert_eq!(seqs(&read_all(&mut spool.replay())), (1..=6).collect::<Vec<_>>());
}

#[test]
fn damage_in_an_earlier_segment_is_reported_not_repaired() {
    let dir = TempDir::new("midseg");
    let config = dir.config(1024, 16 * 1024);
    {
        let (_, mut appender, _) = open(&config);
        fill(&mut appender, 1, 12, 200); // segments 1, 5, 9
    }
    flip(&dir.0.join(segment::file_name(5)), 16 + 216 + 20);
    let (spool, _appender, recovery) = open(&config);
    assert_eq!(recovery.tail_cut, None, "only the last segment is cut");
    let mut reader = spool.replay();
    for seq in 1..=5 {
        assert_eq!(reader.next().expect("intact").map(|r| r.seq), Some(seq));
    }
    match reader.next() {
        Err(SpoolError::Corrupt { path, offset, .. }) => {
            assert_eq!((path, offset), (dir.0.join(segment::file_name(5)), 16 + 216));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn an_earlier_segment_cut_short_is_reported() {
    let dir = TempDir::new("shortseg");
    let config = dir.config(1024, 16 * 1024);
    {
        let (_, mut appender, _) = open(&config);
        fill(&mut appender, 1, 12, 200);
    }
    let path = dir.0.join(segment::file_name(5));
    OpenOptions::new().write(true).open(&path).expect("open").set_len(16 + 2 * 216).expect("truncate");
    let (spool, _appender, _) = open(&config);
    let mut reader = spool.replay();
    let mut got = Vec::new();
    let err = loop {
        match reader.next() {
            Ok(Some(r)) => got.push(r.seq),
            Ok(None) => panic!("records 7 and 8 are missing but the reader finished"),
            Err(e) => break e,
        }
    };
    assert_eq!(got, (1..=6).collect::<Vec<_>>());
    assert!(err.to_string().contains("7..8"), "{err}");
}

#[test]
fn full_at_max_bytes_until_commits_free_room() {
    let dir = TempDir::new("full");
    // Segments of 1024 bytes hold 16 + 4 × 216 = 880.
    let config = dir.config(1024, 2048);
    let (spool, mut appender, _) = open(&config);
    fill(&mut appender, 1, 9, 200);
    let used = spool.stats().used_bytes;
    assert_eq!(used, 880 + 880 + 16 + 216, "two full segments and a third with one record");
    match appender.append(&payload(10, 200)) {
        Err(SpoolError::Full { used_bytes, max_bytes }) => assert_eq!((used_bytes, max_bytes), (used, 2048)),
        other => panic!("expected Full, got {other:?}"),
    }
    assert!(SpoolError::Full { used_bytes: 0, max_bytes: 0 }.is_transient());
    assert_eq!(spool.stats().used_bytes, used, "a refused append reserves nothing");
    let (sender, thread) = appender.spawn().expect("spawn");
    assert!(
        matches!(sender.try_append(payload(10, 200)), Err(SpoolError::Full { .. })),
        "fails fast on the shard side"
    );
    spool.commit_through(4).expect("commit");
    let seq = sender.try_append(payload(10, 200)).expect("room again").wait_blocking().expect("durable");
    assert_eq!(seq, 10);
    drop(sender);
    thread.join().expect("appender");
}

#[test]
fn oversized_records_are_refused() {
    let dir = TempDir::new("large");
    let config = dir.config(1024, 4096);
    let (_, mut appender, _) = open(&config);
    let max = crate::spool::max_payload_bytes(&config) as usize;
    assert_eq!(max, 1024 - 32);
    assert!(matches!(appender.append(&vec![0; max + 1]), Err(SpoolError::TooLarge { .. })));
    assert_eq!(appender.append(&vec![0; max]).expect("largest record"), 1);
}

#[test]
fn a_full_queue_answers_busy_and_reserves_nothing() {
    let dir = TempDir::new("busy");
    let config = SpoolConfig { queue_capacity: 2, ..dir.config(BIG, 4 * BIG) };
    let (spool, appender, _) = open(&config);
    let (sender, rx) = appender.queue();
    let before = spool.stats().used_bytes;
    let waits: Vec<_> = (0..2).map(|i| sender.try_append(payload(i, 10)).expect("room")).collect();
    assert!(matches!(sender.try_append(payload(9, 10)), Err(SpoolError::Busy)));
    assert_eq!(spool.stats().used_bytes, before + 2 * 26);
    drop(sender);
    appender.run(rx);
    for w in waits {
        w.wait_blocking().expect("durable");
    }
}

#[test]
fn a_failed_spool_refuses_appends() {
    let dir = TempDir::new("failed");
    let (spool, mut appender, _) = open(&dir.config(BIG, 4 * BIG));
    let _ = spool.shared.failed.set(Arc::from("fdatasync: EIO"));
    assert!(matches!(appender.append(b"x"), Err(SpoolError::Failed(_))));
    let (sender, _thread) = appender.spawn().expect("spawn");
    assert!(matches!(sender.try_append(b"x".to_vec()), Err(SpoolError::Failed(_))));
    assert!(spool.stats().failed);
}

#[test]
fn a_reader_follows_the_appender() {
    let dir = TempDir::new("follow");
    let (spool, appender, _) = open(&dir.config(1024, 16 * 1024));
    let (sender, thread) = appender.spawn().expect("spawn");
    let mut reader = spool.replay();
    assert_eq!(reader.next().expect("empty"), None);
    assert_eq!(spool.wait_for_records(0, Duration::from_millis(1)), 0, "times out");
    let writer = std::thread::spawn(move || {
        for i in 1..=30 {
            sender.try_append(payload(i, 200)).expect("queued").wait_blocking().expect("durable");
        }
    });
    let mut got = Vec::new();
    while got.len() < 30 {
        match reader.next().expect("read") {
            Some(r) => {
                assert_eq!(r.payload, payload(r.seq, 200));
                got.push(r.seq);
            }
            None => {
                spool.wait_for_records(reader.position() - 1, Duration::from_secs(10));
            }
        }
    }
    assert_eq!(got, (1..=30).collect::<Vec<_>>());
    writer.join().expect("writer");
    thread.join().expect("appender");
    assert!(spool.appender_stopped());
    assert_eq!(spool.wait_for_records(30, Duration::from_secs(10)), 30, "returns at once once stopped");
}

fn flip(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).expect("read");
    bytes[offset as usize] ^= 0x01;
    fs::write(path, bytes).expect("write");
}

const CHILD_DIR: &str = "INGESTD_SPOOL_KILL_TEST_DIR";

/// The child half of the kill test: appends until killed, printing each
/// seq once it is durable. Does nothing unless run by the parent.
#[test]
#[ignore = "run by sigkill_loses_nothing_acknowledged in a child process"]
fn kill_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else { return };
    let config =
        SpoolConfig { dir: dir.into(), segment_bytes: 64 * 1024, max_bytes: BIG * 64, ..SpoolConfig::default() };
    let (_spool, appender, _) = Spool::open(config).expect("open");
    let (sender, _thread) = appender.spawn().expect("spawn");
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let sender = sender.clone();
            std::thread::spawn(move || {
                for i in 0.. {
                    let p = payload(t * 1_000_000 + i, 1000);
                    let seq = sender.try_append(p).expect("queued").wait_blocking().expect("durable");
                    // One line per acknowledged record: seq and which payload.
                    println!("acked {seq} {}", t * 1_000_000 + i);
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

#[test]
fn sigkill_loses_nothing_acknowledged() {
    let dir = TempDir::new("kill");
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["--exact", "spool::tests::kill_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, &dir.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut acked: Vec<(Seq, u64)> = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("line");
        let mut words = line.split_whitespace();
        if words.next() != Some("acked") {
            continue;
        }
        let seq = words.next().and_then(|w| w.parse().ok()).expect("seq");
        let id = words.next().and_then(|w| w.parse().ok()).expect("payload id");
        acked.push((seq, id));
        if acked.len() == 300 {
            child.kill().expect("SIGKILL");
            break;
        }
    }
    child.wait().expect("reap");
    assert_eq!(acked.len(), 300, "the child acknowledged appends before it was killed");

    let config =
        SpoolConfig { dir: dir.0.clone(), segment_bytes: 64 * 1024, max_bytes: BIG * 64, ..SpoolConfig::default() };
    let (spool, _appender, _recovery) = Spool::open(config).expect("reopen after kill");
    let records = read_all(&mut spool.replay());
    let mut lost = 0;
    for (seq, id) in &acked {
        match records.get((*seq - 1) as usize) {
            Some(r) if r.seq == *seq && r.payload == payload(*id, 1000) => {}
            _ => lost += 1,
        }
    }
    println!("sigkill: acked {} (seen), present {}, lost {lost}", acked.len(), records.len());
    assert_eq!(lost, 0);
    assert!(records.len() >= acked.len());
}
