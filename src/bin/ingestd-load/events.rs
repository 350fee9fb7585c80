//! Event generator shared by every mode (HTTP load and the COPY baseline), so
//! that ingestd and the baseline store the same kind of rows.
//!
//! An event looks like (≈ 300 bytes, of which ≈ 190 are the payload):
//!
//! ```json
//! {"event_id":"5f3a9c1e-003-0000001234","device_id":"dev-04711","type":"telemetry",
//!  "ts":1767225600000,"payload":{"temp_c":21.53,"humidity_pct":48.2,...}}
//! ```
//!
//! `event_id` is `<run id>-<worker>-<sequence>`: unique per run (the run id is
//! random per invocation), and each worker's ids increase (`--ids seq`), or
//! `<run id>-<worker>-<16 hex digits>` hashed from the sequence (`--ids random`),
//! which spreads inserts over the whole primary-key index like random UUIDs,
//! or absent (`--ids none`): ingestd then assigns time-ordered UUIDv7s.
//! Because an id is a function of (worker, sequence), a deliberate duplicate
//! is simply an earlier sequence number of the same worker.

/// splitmix64: small, fast, good enough for load generation.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: f64) -> bool {
        percent > 0.0 && self.unit() * 100.0 < percent
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    /// `<run>-<worker>-<zero-padded sequence>`: increasing per worker.
    Seq,
    /// `<run>-<worker>-<16 hex digits>`: uniformly spread, like UUIDv4.
    Random,
    /// No `event_id`: ingestd assigns a UUIDv7 (time-ordered) to each event.
    None,
}

impl std::str::FromStr for IdKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "seq" => Ok(IdKind::Seq),
            "random" => Ok(IdKind::Random),
            "none" => Ok(IdKind::None),
            _ => Err("expected seq, random or none".into()),
        }
    }
}

impl IdKind {
    pub fn name(self) -> &'static str {
        match self {
            IdKind::Seq => "seq",
            IdKind::Random => "random",
            IdKind::None => "none",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DupMode {
    /// A duplicated event reuses the id of a random recent event of the same worker.
    Spread,
    /// A duplicated request re-sends a whole recent request body unchanged.
    Resend,
}

impl std::str::FromStr for DupMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "spread" => Ok(DupMode::Spread),
            "resend" => Ok(DupMode::Resend),
            _ => Err("expected spread or resend".into()),
        }
    }
}

impl DupMode {
    pub fn name(self) -> &'static str {
        match self {
            DupMode::Spread => "spread",
            DupMode::Resend => "resend",
        }
    }
}

/// What every generator of one run shares.
#[derive(Debug, Clone)]
pub struct GenConfig {
    pub run_id: String,
    pub devices: u32,
    pub ids: IdKind,
    /// Percent of events (spread) or requests (resend) that are duplicates.
    pub dup_percent: f64,
    pub dup_mode: DupMode,
    /// Spread duplicates reuse an id among the worker's last `dup_window` events.
    pub dup_window: u64,
}

impl GenConfig {
    /// A run id: 8 hex digits from the clock and the process id.
    pub fn new_run_id() -> String {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        format!("{:08x}", mix(nanos ^ (u64::from(std::process::id()) << 32)) as u32)
    }
}

/// How many events a generated body holds, and how many of them repeat an
/// earlier id on purpose.
#[derive(Debug, Clone, Copy, Default)]
pub struct BodyInfo {
    pub events: u64,
    pub dups: u64,
}

const TYPES: [&str; 8] =
    ["telemetry", "telemetry", "telemetry", "telemetry", "telemetry", "heartbeat", "status", "alarm"];
const STATUS: [&str; 4] = ["ok", "ok", "ok", "degraded"];
const FW: [&str; 3] = ["2.4.17", "2.4.18", "3.0.1"];

/// One worker's generator. Not shared between threads.
pub struct Generator {
    cfg: GenConfig,
    rng: Rng,
    /// `<run>-<worker>-`.
    prefix: Vec<u8>,
    next_seq: u64,
}

impl Generator {
    pub fn new(cfg: &GenConfig, worker: u32) -> Self {
        let prefix = format!("{}-{:03}-", cfg.run_id, worker).into_bytes();
        let run_hash =
            cfg.run_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let seed = mix(u64::from(worker) ^ run_hash.rotate_left(20));
        Self { cfg: cfg.clone(), rng: Rng::new(seed), prefix, next_seq: 0 }
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Events generated so far with a new id.
    #[cfg(test)]
    pub fn unique_generated(&self) -> u64 {
        self.next_seq
    }

    /// Writes a JSON array of `n` events into `out` (cleared first).
    pub fn batch(&mut self, n: usize, now_ms: u64, out: &mut Vec<u8>) -> BodyInfo {
        out.clear();
        out.push(b'[');
        let mut info = BodyInfo::default();
        for i in 0..n {
            if i > 0 {
                out.push(b',');
            }
            info.dups += u64::from(self.event(now_ms, out));
            info.events += 1;
        }
        out.push(b']');
        info
    }

    /// Writes one event object into `out` (cleared first).
    pub fn single(&mut self, now_ms: u64, out: &mut Vec<u8>) -> BodyInfo {
        out.clear();
        let dup = self.event(now_ms, out);
        BodyInfo { events: 1, dups: u64::from(dup) }
    }

    /// Appends one event; returns whether it deliberately repeats an earlier id.
    fn event(&mut self, now_ms: u64, out: &mut Vec<u8>) -> bool {
        let spread = self.cfg.dup_mode == DupMode::Spread;
        let dup = spread && self.next_seq > 0 && self.rng.percent(self.cfg.dup_percent);
        let seq = if dup {
            let window = self.cfg.dup_window.clamp(1, self.next_seq);
            self.next_seq - 1 - self.rng.below(window)
        } else {
            self.next_seq += 1;
            self.next_seq - 1
        };
        let r = &mut self.rng;
        if self.cfg.ids == IdKind::None {
            out.extend_from_slice(b"{\"device_id\":\"dev-");
        } else {
            out.extend_from_slice(b"{\"event_id\":\"");
            out.extend_from_slice(&self.prefix);
            match self.cfg.ids {
                IdKind::Random => put_hex(out, mix(seq ^ 0xA5A5_5A5A_0F0F_F0F0)),
                _ => put_padded(out, seq, 10),
            }
            out.extend_from_slice(b"\",\"device_id\":\"dev-");
        }
        let device = r.below(u64::from(self.cfg.devices.max(1)));
        put_padded(out, device, 5);
        out.extend_from_slice(b"\",\"type\":\"");
        out.extend_from_slice(TYPES[r.below(TYPES.len() as u64) as usize].as_bytes());
        out.extend_from_slice(b"\",\"ts\":");
        put_u64(out, now_ms);
        // The payload: ≈ 190 bytes of numbers, strings, an object and an array.
        out.extend_from_slice(b",\"payload\":{\"temp_c\":");
        put_fixed(out, 1500 + r.below(2000) as i64, 2);
        out.extend_from_slice(b",\"humidity_pct\":");
        put_fixed(out, 200 + r.below(700) as i64, 1);
        out.extend_from_slice(b",\"pressure_hpa\":");
        put_fixed(out, 98_000 + r.below(5_000) as i64, 2);
        out.extend_from_slice(b",\"battery_v\":");
        put_fixed(out, 330 + r.below(90) as i64, 2);
        out.extend_from_slice(b",\"rssi_dbm\":");
        put_fixed(out, -(40 + r.below(60) as i64), 0);
        out.extend_from_slice(b",\"fw\":\"");
        out.extend_from_slice(FW[r.below(FW.len() as u64) as usize].as_bytes());
        out.extend_from_slice(b"\",\"status\":\"");
        out.extend_from_slice(STATUS[r.below(STATUS.len() as u64) as usize].as_bytes());
        out.extend_from_slice(b"\",\"seq\":");
        put_u64(out, seq);
        out.extend_from_slice(b",\"loc\":{\"lat\":");
        put_fixed(out, 52_000_000 + r.below(1_000_000) as i64, 6);
        out.extend_from_slice(b",\"lon\":");
        put_fixed(out, 13_000_000 + r.below(1_000_000) as i64, 6);
        out.extend_from_slice(b"},\"tags\":[\"field\",\"v2\"]}}");
        dup
    }
}

fn put_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

fn put_padded(out: &mut Vec<u8>, v: u64, width: usize) {
    let mut buf = [b'0'; 20];
    let mut i = buf.len();
    let mut x = v;
    while x > 0 {
        i -= 1;
        buf[i] = b'0' + (x % 10) as u8;
        x /= 10;
    }
    let start = i.min(buf.len() - width);
    out.extend_from_slice(&buf[start..]);
}

fn put_hex(out: &mut Vec<u8>, v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..16).rev() {
        out.push(HEX[((v >> (shift * 4)) & 0xf) as usize]);
    }
}

/// Writes `v / 10^decimals` with exactly `decimals` digits after the point.
fn put_fixed(out: &mut Vec<u8>, v: i64, decimals: u32) {
    if v < 0 {
        out.push(b'-');
    }
    let a = v.unsigned_abs();
    let scale = 10u64.pow(decimals);
    put_u64(out, a / scale);
    if decimals > 0 {
        out.push(b'.');
        put_padded(out, a % scale, decimals as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dup: f64, mode: DupMode, ids: IdKind) -> GenConfig {
        GenConfig {
            run_id: "0123abcd".into(),
            devices: 10_000,
            ids,
            dup_percent: dup,
            dup_mode: mode,
            dup_window: 1000,
        }
    }

    #[test]
    fn events_are_valid_json_of_the_expected_size() {
        for ids in [IdKind::Seq, IdKind::Random, IdKind::None] {
            let mut g = Generator::new(&cfg(0.0, DupMode::Spread, ids), 3);
            let mut out = Vec::new();
            let info = g.batch(100, 1_767_225_600_000, &mut out);
            assert_eq!(info.events, 100);
            assert_eq!(info.dups, 0);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let arr = v.as_array().unwrap();
            assert_eq!(arr.len(), 100);
            let ev = &arr[7];
            if ids == IdKind::None {
                assert!(ev.get("event_id").is_none());
                continue;
            }
            assert!(ev["event_id"].as_str().unwrap().starts_with("0123abcd-003-"));
            let payload = serde_json::to_string(&ev["payload"]).unwrap();
            assert!((170..=210).contains(&payload.len()), "{} {payload}", payload.len());
            let ids: std::collections::HashSet<_> =
                arr.iter().map(|e| e["event_id"].as_str().unwrap().to_string()).collect();
            assert_eq!(ids.len(), 100);
            assert!((28_000..36_000).contains(&out.len()), "{}", out.len());
        }
    }

    #[test]
    fn spread_duplicates_reuse_earlier_ids() {
        let mut g = Generator::new(&cfg(10.0, DupMode::Spread, IdKind::Seq), 0);
        let mut out = Vec::new();
        let mut all = std::collections::HashSet::new();
        let (mut dups, mut events) = (0, 0);
        for _ in 0..100 {
            let info = g.batch(100, 1_767_225_600_000, &mut out);
            dups += info.dups;
            events += info.events;
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            for e in v.as_array().unwrap() {
                all.insert(e["event_id"].as_str().unwrap().to_string());
            }
        }
        assert_eq!(all.len() as u64, events - dups);
        assert_eq!(g.unique_generated(), events - dups);
        assert!((700..1300).contains(&dups), "{dups}");
    }

    #[test]
    fn number_formatting() {
        let mut v = Vec::new();
        put_fixed(&mut v, -5, 2);
        v.push(b' ');
        put_fixed(&mut v, 123_456, 3);
        v.push(b' ');
        put_padded(&mut v, 42, 5);
        v.push(b' ');
        put_u64(&mut v, 0);
        assert_eq!(String::from_utf8(v).unwrap(), "-0.05 123.456 00042 0");
    }
}
