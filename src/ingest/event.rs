//! The event rules of the contract, one function per field: pure, no I/O.
//!
//! Anything PostgreSQL would refuse is refused here, per event and with a
//! reason, so that one bad event can never fail a COPY batch: NUL characters
//! (neither `text` nor `jsonb` can hold U+0000), raw control characters inside
//! JSON strings (PostgreSQL's JSON parser refuses them), timestamps outside
//! the contract's window, and non-finite numbers.

use std::borrow::Cow;

use crate::labels::RejectKind;
use crate::row::{PG_EPOCH_UNIX_SECS, PgMicros, pg_micros_from_unix_micros};

/// Why one event was rejected: a closed kind (a metric label) and the
/// message sent back to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    pub kind: RejectKind,
    pub message: Cow<'static, str>,
}

impl Reason {
    pub fn new(kind: RejectKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self { kind, message: message.into() }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Longest `event_id`, `device_id` (bytes).
pub const MAX_ID_BYTES: usize = 128;
/// Longest `type` (bytes).
pub const MAX_TYPE_BYTES: usize = 64;
/// `ts` may not be before 2000-01-01T00:00:00Z.
pub const MIN_TS_UNIX_MICROS: i64 = PG_EPOCH_UNIX_SECS * 1_000_000;

/// The top-level fields of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    EventId,
    DeviceId,
    Type,
    Ts,
    Payload,
}

impl Field {
    pub fn from_key(key: &str) -> Option<Field> {
        Some(match key {
            "event_id" => Field::EventId,
            "device_id" => Field::DeviceId,
            "type" => Field::Type,
            "ts" => Field::Ts,
            "payload" => Field::Payload,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Field::EventId => "event_id",
            Field::DeviceId => "device_id",
            Field::Type => "type",
            Field::Ts => "ts",
            Field::Payload => "payload",
        }
    }

    pub fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// `event_id`: 1–128 bytes of `[A-Za-z0-9._:-]`.
pub fn check_event_id(id: &str) -> Result<(), Reason> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(Reason::new(RejectKind::InvalidValue, "event_id must be 1-128 bytes"));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')) {
        return Err(Reason::new(RejectKind::InvalidValue, "event_id may only contain A-Z a-z 0-9 . _ : -"));
    }
    Ok(())
}

/// A required text field: `1..=max` bytes, no NUL.
pub fn check_text(field: Field, value: &str, max: usize) -> Result<(), Reason> {
    if value.is_empty() || value.len() > max {
        return Err(Reason::new(RejectKind::InvalidValue, format!("{} must be 1-{max} bytes", field.name())));
    }
    if value.as_bytes().contains(&0) {
        return Err(Reason::new(
            RejectKind::NulCharacter,
            format!("{} contains a NUL character (\\u0000), which PostgreSQL cannot store", field.name()),
        ));
    }
    Ok(())
}

/// The accepted window for `ts`, in Unix microseconds.
#[derive(Debug, Clone, Copy)]
pub struct TsWindow {
    pub now_unix_us: i64,
    pub max_future_skew_us: i64,
}

impl TsWindow {
    fn check(&self, unix_us: i64) -> Result<PgMicros, Reason> {
        if unix_us < MIN_TS_UNIX_MICROS {
            return Err(Reason::new(RejectKind::TsOutOfRange, "ts is before 2000-01-01T00:00:00Z"));
        }
        if unix_us > self.now_unix_us.saturating_add(self.max_future_skew_us) {
            return Err(Reason::new(
                RejectKind::TsOutOfRange,
                format!("ts is more than {} ms ahead of the server clock", self.max_future_skew_us / 1000),
            ));
        }
        Ok(pg_micros_from_unix_micros(unix_us))
    }

    /// `ts` given as an RFC 3339 string; precision below a microsecond is cut.
    pub fn from_rfc3339(&self, text: &str) -> Result<PgMicros, Reason> {
        let parsed = chrono::DateTime::parse_from_rfc3339(text).map_err(|e| {
            Reason::new(
                RejectKind::InvalidValue,
                format!("ts is not an RFC 3339 timestamp ({e}), e.g. 2026-01-02T03:04:05.678Z"),
            )
        })?;
        self.check(parsed.timestamp_micros())
    }

    /// `ts` given as integer epoch milliseconds.
    pub fn from_epoch_ms(&self, ms: i128) -> Result<PgMicros, Reason> {
        let us = ms.checked_mul(1000).and_then(|us| i64::try_from(us).ok());
        match us {
            Some(us) => self.check(us),
            None => Err(Reason::new(RejectKind::TsOutOfRange, "ts is out of range")),
        }
    }
}

/// Checks a JSON string found inside a payload (a key or a value), decoded.
/// `Ok(true)` means it holds a control character, which is fine if it was
/// written as an escape: the caller then scans the raw text (rare, so cheap).
pub fn check_payload_string(s: &str) -> Result<bool, Reason> {
    let bytes = s.as_bytes();
    if !bytes.iter().any(|&b| b < 0x20) {
        return Ok(false);
    }
    if bytes.contains(&0) {
        return Err(Reason::new(
            RejectKind::NulCharacter,
            "payload contains a NUL character (\\u0000), which PostgreSQL jsonb cannot store",
        ));
    }
    Ok(true)
}

/// Scans raw JSON text for control characters inside strings, which JSON
/// forbids unescaped and PostgreSQL refuses (simd-json lets them through).
pub fn check_raw_strings(raw: &[u8]) -> Result<(), Reason> {
    let mut in_string = false;
    let mut escaped = false;
    for &b in raw {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            } else if b < 0x20 {
                return Err(Reason::new(
                    RejectKind::Malformed,
                    "payload has a raw control character inside a string; escape it (e.g. \\n)",
                ));
            }
        } else if b == b'"' {
            in_string = true;
        }
    }
    Ok(())
}

/// Most digits after the decimal point PostgreSQL's `numeric` (the type of
/// a jsonb number) keeps: its `NUMERIC_DSCALE_MAX`.
pub const MAX_NUMERIC_SCALE: i64 = 0x3fff;

/// `numeric_in` refuses an exponent this large either way, even on 0
/// (`INT_MAX / 2`).
pub const NUMERIC_EXPONENT_LIMIT: i64 = (i32::MAX / 2) as i64;

/// Checks one number of a payload, as written (from its first character to
/// the next structural one), against the JSON grammar and what `numeric`
/// stores. simd-json 0.17 lets two kinds through that PostgreSQL refuses:
///
/// - a number of 19 or more digits followed by junk up to the next
///   structural character (`1234567890123456789x`, `1.00000000000000000000x`):
///   its slow path does not check what ends the number;
/// - a display scale (digits after the point, less the exponent) beyond
///   [`MAX_NUMERIC_SCALE`], such as `1e-16384`, or an exponent of
///   [`NUMERIC_EXPONENT_LIMIT`] or more (`0e1073741823`): f64 reads them as 0
///   or as an ordinary number, numeric says "value overflows numeric
///   format". (Nonzero numbers too large for numeric are too large for f64.)
pub fn check_number(text: &[u8]) -> Result<(), Reason> {
    let malformed = || Reason::new(RejectKind::Malformed, "payload holds a malformed number");
    let mut at = 0;
    let digits = |at: &mut usize| {
        let start = *at;
        while text.get(*at).is_some_and(u8::is_ascii_digit) {
            *at += 1;
        }
        &text[start..*at]
    };
    // -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?, then JSON whitespace.
    if text.first() == Some(&b'-') {
        at += 1;
    }
    let int = digits(&mut at);
    if int.is_empty() || (int.len() > 1 && int[0] == b'0') {
        return Err(malformed());
    }
    let mut scale: i64 = 0;
    if text.get(at) == Some(&b'.') {
        at += 1;
        scale = digits(&mut at).len() as i64;
        if scale == 0 {
            return Err(malformed());
        }
    }
    let mut exponent = 0;
    if matches!(text.get(at), Some(b'e' | b'E')) {
        at += 1;
        let negative = text.get(at) == Some(&b'-');
        if matches!(text.get(at), Some(b'-' | b'+')) {
            at += 1;
        }
        let written = digits(&mut at);
        if written.is_empty() {
            return Err(malformed());
        }
        exponent = written.iter().fold(0i64, |e, &d| e.saturating_mul(10).saturating_add(i64::from(d - b'0')));
        scale = if negative { scale.saturating_add(exponent) } else { scale.saturating_sub(exponent) };
    }
    if !text[at..].iter().all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
        return Err(malformed());
    }
    if scale > MAX_NUMERIC_SCALE {
        return Err(Reason::new(
            RejectKind::InvalidValue,
            "payload holds a number with more than 16383 digits after the decimal point, which PostgreSQL cannot store",
        ));
    }
    if exponent >= NUMERIC_EXPONENT_LIMIT {
        return Err(Reason::new(
            RejectKind::InvalidValue,
            "payload holds a number whose exponent PostgreSQL cannot store",
        ));
    }
    Ok(())
}

/// Scans raw JSON text for `\u` escapes of UTF-16 surrogates that do not
/// pair up: a high one (D800-DBFF) not followed by a `\u` low one
/// (DC00-DFFF), or a low one alone. PostgreSQL refuses them; simd-json 0.17
/// does not check the second half of a pair (`\ud83d\uee00` decodes as
/// U+1F600), so only the raw text tells. A pair always decodes to a
/// character beyond U+FFFF, so only strings holding one need the scan.
pub fn check_raw_surrogates(raw: &[u8]) -> Result<(), Reason> {
    let unit = |at: usize| -> Option<u16> {
        let hex = raw.get(at..at + 6).filter(|h| h.starts_with(b"\\u"))?;
        u16::from_str_radix(std::str::from_utf8(&hex[2..]).ok()?, 16).ok()
    };
    let bad = || Reason::new(RejectKind::InvalidValue, "payload holds a \\u escape of a lone UTF-16 surrogate");
    let (mut in_string, mut at) = (false, 0);
    while at < raw.len() {
        match raw[at] {
            b'"' => {
                in_string = !in_string;
                at += 1;
            }
            b'\\' if in_string => match unit(at) {
                Some(0xd800..=0xdbff) => match unit(at + 6) {
                    Some(0xdc00..=0xdfff) => at += 12,
                    _ => return Err(bad()),
                },
                Some(0xdc00..=0xdfff) => return Err(bad()),
                Some(_) => at += 6,
                None => at += 2,
            },
            _ => at += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: TsWindow = TsWindow { now_unix_us: 1_780_000_000_000_000, max_future_skew_us: 300_000_000 };

    #[test]
    fn event_ids() {
        assert!(check_event_id("a.b_c:d-E9").is_ok());
        assert!(check_event_id("").is_err());
        assert!(check_event_id(&"x".repeat(129)).is_err());
        assert!(check_event_id(&"x".repeat(128)).is_ok());
        assert!(check_event_id("a b").is_err());
        assert!(check_event_id("é").is_err());
    }

    #[test]
    fn text_fields() {
        assert!(check_text(Field::DeviceId, "d", MAX_ID_BYTES).is_ok());
        assert!(check_text(Field::DeviceId, "", MAX_ID_BYTES).is_err());
        assert!(check_text(Field::Type, &"t".repeat(65), MAX_TYPE_BYTES).is_err());
        let e = check_text(Field::DeviceId, "a\0b", MAX_ID_BYTES).unwrap_err();
        assert_eq!(e.kind, RejectKind::NulCharacter, "{e}");
    }

    #[test]
    fn timestamps() {
        assert!(WINDOW.from_rfc3339("2026-01-02T03:04:05.678+02:00").is_ok());
        assert!(WINDOW.from_rfc3339("1999-12-31T23:59:59Z").unwrap_err().message.contains("2000"));
        assert!(WINDOW.from_rfc3339("yesterday").is_err());
        assert!(WINDOW.from_rfc3339("2030-01-01T00:00:00Z").unwrap_err().message.contains("ahead"));
        assert_eq!(WINDOW.from_rfc3339("2000-01-01T00:00:00Z"), Ok(0));
        assert_eq!(WINDOW.from_epoch_ms(946_684_800_001), Ok(1000));
        assert!(WINDOW.from_epoch_ms(i128::from(i64::MAX)).is_err());
        assert!(WINDOW.from_epoch_ms(-1).is_err());
    }

    #[test]
    fn payload_strings() {
        assert_eq!(check_payload_string("plain"), Ok(false));
        assert_eq!(check_payload_string("tab\there"), Ok(true));
        assert!(check_payload_string("nul\0").is_err());
        assert!(check_raw_strings(br#"{"a":"x\ny"}"#).is_ok());
        assert!(check_raw_strings(b"{\"a\":\"x\ny\"}").is_err());
        assert!(check_raw_strings(b"{\n\"a\":\t1}").is_ok());
        assert!(check_raw_strings(br#"{"a\"":"\\"}"#).is_ok());
    }

    #[test]
    fn payload_numbers() {
        for ok in
            ["1e-16383", "1.5", "-2e+5", "0.1e-16382", "0 ", "-0.0E0\r\n", "0e1073741822", "12345678901234567890123"]
        {
            assert_eq!(check_number(ok.as_bytes()), Ok(()), "{ok}");
        }
        let long = format!("1.{}", "0".repeat(16_384));
        for bad in ["1e-16384", "0.5e-16383", "-1E-99999999999999999999999", &long, "0e1073741823", "0.0E+99999999999"]
        {
            assert_eq!(check_number(bad.as_bytes()).map_err(|e| e.kind), Err(RejectKind::InvalidValue), "{bad}");
        }
        for junk in [
            "1234567890123456789x",
            "1.00000000000000000000x",
            "1234567890123456789012345<7890",
            "01",
            "1.",
            "1e",
            "-",
            "1.5e+",
            "1\x0c",
            "1 2",
        ] {
            assert_eq!(check_number(junk.as_bytes()).map_err(|e| e.kind), Err(RejectKind::Malformed), "{junk}");
        }
    }

    #[test]
    fn payload_surrogate_escapes() {
        for ok in [
            &br#""\ud83d\ude00""#[..],
            br#"{"\uDBFF\uDFFF":"\\ud800 \u00e9"}"#,
            br#""a\"b""#,
            "\"\u{1f600}\"".as_bytes(),
        ] {
            assert_eq!(check_raw_surrogates(ok), Ok(()), "{}", ok.escape_ascii());
        }
        for bad in
            [&br#""\ud83d\uee00""#[..], br#"["\ud800\uffff"]"#, br#""\ud800x""#, br#"{"k":"\udc00"}"#, br#""\ud800\n""#]
        {
            assert!(check_raw_surrogates(bad).is_err(), "{}", bad.escape_ascii());
        }
    }
}
