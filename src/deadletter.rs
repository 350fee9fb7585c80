//! `ingestd dead-letter list|replay|purge`: the dead-letter table
//! (`<table>_dead_letter`) looked at, re-submitted once the cause is fixed,
//! and emptied, from the same binary and configuration as the appliance.
//!
//! Why here and this way:
//!
//! - **Same connection path**: [`crate::writer::connect::Access`] (TLS
//!   modes, CA, client certificate, password file, `PGPASSWORD`) and
//!   [`db::pg_config`], so the commands reach a managed database exactly
//!   as the writers do. Every statement runs in a [`Tx`] that sets
//!   `statement_timeout` itself (no session state: PgBouncer in
//!   transaction mode works), and every prepared statement is dropped
//!   before its transaction ends (see [`crate::writer::db`]).
//! - **What the table holds**: not the request's JSON but the event's
//!   fields (`event_id`, `device_id`, `event_type`, `ts`, `received_at`)
//!   and the payload as the exact JSON text the client sent, plus `error`
//!   and `failed_at`; there is no id column, so a dead letter is named by
//!   its `event_id` (two letters with the same id, a re-sent event refused
//!   twice, are one: replayed once, deleted together).
//! - **Replay re-validates** each letter with the HTTP path's own parser
//!   ([`crate::ingest::Parser`], the configured rules): the fields are put
//!   back into one event object and parsed with the clock set to the
//!   letter's `received_at`, so the rules see the event as they did when it
//!   arrived (the future-skew window) and the row keeps its original
//!   `received_at`. The rows are the same binary COPY tuples
//!   ([`crate::row`]) and go through the writers' own
//!   [`db::copy_batch_with`], all as suspects: staging + `ON CONFLICT
//!   (event_id) DO NOTHING`, so an event already stored is stored nothing
//!   twice, and with `[state]` on the latest state is upserted by the same
//!   rules (a late event never overwrites a newer state). In that same
//!   transaction the letters of the page are deleted: a crash leaves either
//!   both or neither, so nothing is lost or doubled; replaying twice finds
//!   nothing the second time.
//! - **A refused row does not poison its page**: a page PostgreSQL refuses
//!   is split in halves until the refused letters stand alone, as the
//!   writers isolate a batch; those stay, with their `error` updated to
//!   the new reason (`failed_at` keeps the first failure).
//! - **Bounded**: letters are read in pages of [`PAGE`] by `event_id`
//!   (keyset), purges delete at most [`PURGE_CHUNK`] rows per transaction,
//!   `list` shows at most [`MAX_LIST`].
//!
//! Exit codes (README.md): 0 done; 64 bad usage or configuration; 65 replay
//! left letters that are still refused (validation or PostgreSQL; counts
//! and reasons printed); 69 the database is unreachable, refuses us, or a
//! table is missing (what was done before is printed and committed).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postgres::Client;
use postgres::types::ToSql;

use crate::config::Config;
use crate::ingest::{BodyKind, Clock, Parser, Rules};
use crate::row::RowBuf;
use crate::writer::connect::Access;
use crate::writer::db::{self, Committed, Ending, Statements, Tx, WriteError};

/// Letters read (and replayed) per transaction.
pub const PAGE: usize = 500;
/// Rows deleted per transaction by `purge`.
pub const PURGE_CHUNK: i64 = 10_000;
/// Most letters `list` shows.
pub const MAX_LIST: u64 = 10_000;
/// Payload characters `list` shows (text; JSON gets [`JSON_PAYLOAD_CHARS`]).
const TEXT_PAYLOAD_CHARS: usize = 80;
const JSON_PAYLOAD_CHARS: i32 = 1_000;

pub const USAGE: &str = "\
usage: ingestd [--config FILE] [--database-url URL] [--set S.K=V]... dead-letter COMMAND
  list   [--limit N] [--since TIME] [--json]
         the waiting dead letters (oldest failure first, at most N, default 100)
         with the total and the reasons grouped
  replay [--limit N] [--id EVENT_ID]... [--dry-run] [--json]
         re-validate and store them (idempotent: an event already stored is
         not stored twice); each stored one leaves the table in the same
         transaction; still refused ones stay with the new error
  purge  (--all --yes | --before TIME | --id EVENT_ID...) [--json]
         delete them
TIME: RFC 3339 (2026-01-02T03:04:05Z), a date (2026-01-02, UTC), or an age
(30m, 12h, 7d: that long ago). --since/--before compare with failed_at.
Exit codes: 0 done, 64 bad usage, 65 replay left refused letters,
69 database unreachable or refusing, or a table missing.";

/// One parsed `dead-letter` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    List { limit: u64, since: Option<SystemTime>, json: bool },
    Replay { limit: Option<u64>, ids: Vec<String>, dry_run: bool, json: bool },
    Purge { scope: Scope, json: bool },
}

/// What `purge` deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Before(SystemTime),
    Ids(Vec<String>),
}

/// Parses the words after `dead-letter` (global flags already taken out).
pub fn parse_args(args: &[String], now: SystemTime) -> Result<Command, String> {
    let Some((verb, rest)) = args.split_first() else { return Err("dead-letter needs a command".into()) };
    let mut limit: Option<u64> = None;
    let mut since: Option<SystemTime> = None;
    let mut before: Option<SystemTime> = None;
    let mut ids = Vec::new();
    let (mut json, mut dry_run, mut all, mut yes) = (false, false, false, false);
    let mut words = rest.iter();
    while let Some(word) = words.next() {
        let (flag, inline) = match word.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (word.as_str(), None),
        };
        let mut value = || inline.clone().or_else(|| words.next().cloned()).ok_or(format!("{flag} needs a value"));
        match (verb.as_str(), flag) {
            (_, "--json") => json = true,
            ("list" | "replay", "--limit") => {
                let v = value()?;
                let n: u64 = v.parse().map_err(|_| format!("--limit {v}: expected a whole number"))?;
                if n == 0 {
                    return Err("--limit must be at least 1".into());
                }
                limit = Some(n);
            }
            ("list", "--since") => since = Some(parse_time("--since", &value()?, now)?),
            ("replay", "--dry-run") => dry_run = true,
            ("replay" | "purge", "--id") => ids.push(value()?),
            ("purge", "--all") => all = true,
            ("purge", "--yes") => yes = true,
            ("purge", "--before") => before = Some(parse_time("--before", &value()?, now)?),
            _ => return Err(format!("dead-letter {verb}: unknown argument {word}")),
        }
    }
    match verb.as_str() {
        "list" => {
            let limit = limit.unwrap_or(100);
            if limit > MAX_LIST {
                return Err(format!("--limit {limit}: list shows at most {MAX_LIST}"));
            }
            Ok(Command::List { limit, since, json })
        }
        "replay" => Ok(Command::Replay { limit, ids, dry_run, json }),
        "purge" => {
            let scope = match (all, before, ids.is_empty()) {
                (true, None, true) if yes => Scope::All,
                (true, None, true) => {
                    return Err("purge --all deletes every dead letter: add --yes to confirm".into());
                }
                (false, Some(t), true) => Scope::Before(t),
                (false, None, false) => Scope::Ids(ids),
                (false, None, true) => return Err("purge needs --all --yes, --before TIME or --id EVENT_ID".into()),
                _ => return Err("purge takes one of --all, --before, --id".into()),
            };
            Ok(Command::Purge { scope, json })
        }
        other => Err(format!("dead-letter: unknown command {other} (list, replay, purge)")),
    }
}

/// RFC 3339, a UTC date, or an age (`30s`, `15m`, `12h`, `7d`) before `now`.
fn parse_time(flag: &str, text: &str, now: SystemTime) -> Result<SystemTime, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&chrono::Utc).into());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(t.and_utc().into());
    }
    let unit = match text.chars().last() {
        Some('s') => 1,
        Some('m') => 60,
        Some('h') => 3_600,
        Some('d') => 86_400,
        _ => 0,
    };
    let number = text.get(..text.len().saturating_sub(1)).and_then(|n| n.parse::<u64>().ok());
    match number {
        Some(n) if unit > 0 => {
            now.checked_sub(Duration::from_secs(n.saturating_mul(unit))).ok_or(format!("{flag} {text}: too far back"))
        }
        _ => Err(format!(
            "{flag} {text}: expected RFC 3339 (2026-01-02T03:04:05Z), a date (2026-01-02) or an age (30m, 12h, 7d)"
        )),
    }
}

/// Why a command stopped.
#[derive(Debug)]
pub enum Failure {
    /// Unreachable, refusing us, or a table missing: exit 69.
    Database(String),
}

/// What a command printed, why it stopped (for stderr) and its exit code.
pub struct Ran {
    pub output: String,
    pub error: Option<String>,
    pub code: u8,
}

/// Runs `command` against the configured database.
pub fn run(command: &Command, config: &Config, access: &Access) -> Ran {
    let sql = Statements::new(
        &config.database.table,
        &config.dead_letter_table(),
        config.database.statement_timeout_ms,
        config.state_table().as_deref(),
    );
    let mut out = String::new();
    let result = connect(config, access).and_then(|mut client| match command {
        Command::List { limit, since, json } => list(&mut client, &sql, *limit, *since, *json, &mut out).map(|()| 0),
        Command::Replay { limit, ids, dry_run, json } => {
            let mut parser = Parser::new(Rules::from_config(&config.ingest));
            let options = ReplayOptions { limit: *limit, ids, dry_run: *dry_run, create: config.database.create_table };
            let mut tally = Tally::default();
            let result = replay(&mut client, &sql, &mut parser, &options, &mut tally);
            let remaining = count(&mut client, &sql).ok();
            tally.render(&sql, remaining, *dry_run, *json, &mut out);
            result.map(|()| if tally.failing.is_empty() { 0 } else { 65 })
        }
        Command::Purge { scope, json } => purge(&mut client, &sql, scope, *json, &mut out).map(|()| 0),
    });
    match result {
        Ok(code) => Ran { output: out, error: None, code },
        Err(Failure::Database(why)) => Ran { output: out, error: Some(why), code: 69 },
    }
}

fn connect(config: &Config, access: &Access) -> Result<Client, Failure> {
    let mut pg = db::pg_config(&config.database).map_err(|e| Failure::Database(access.describe(&e)))?;
    pg.application_name("ingestd-dead-letter");
    access.connect(&pg).map_err(|e| Failure::Database(format!("cannot connect to PostgreSQL: {}", access.describe(&e))))
}

fn database(e: &postgres::Error) -> Failure {
    Failure::Database(db::describe(e))
}

/// Letters waiting, in a transaction of its own.
fn count(client: &mut Client, sql: &Statements) -> Result<u64, Failure> {
    db::count_dead_letters(client, sql, sql.statement_timeout_ms).map_err(|e| database(&e))
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// The first `max` characters of `s`, and whether it was cut.
fn cut(s: &str, max: usize) -> (&str, bool) {
    match s.char_indices().nth(max) {
        Some((at, _)) => (&s[..at], true),
        None => (s, false),
    }
}

fn list(
    client: &mut Client,
    sql: &Statements,
    limit: u64,
    since: Option<SystemTime>,
    json: bool,
    out: &mut String,
) -> Result<(), Failure> {
    let dead = &sql.dead_letter_table;
    let filter = "($1::timestamptz IS NULL OR failed_at >= $1)";
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut tx = Tx::begin(client, sql.statement_timeout_ms).map_err(|e| database(&e))?;
    let total: i64 = tx.query_one(&format!("SELECT count(*) FROM {dead}"), &[]).map_err(|e| database(&e))?.get(0);
    let matching: i64 = tx
        .query_one(&format!("SELECT count(*) FROM {dead} WHERE {filter}"), &[&since])
        .map_err(|e| database(&e))?
        .get(0);
    let reasons = tx
        .query(
            &format!(
                "SELECT left(error, 300), count(*) FROM {dead} WHERE {filter} GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 20"
            ),
            &[&since],
        )
        .map_err(|e| database(&e))?;
    let rows = tx
        .query(
            &format!(
                "SELECT event_id, device_id, event_type, ts, received_at, failed_at, error, \
                 left(payload, {JSON_PAYLOAD_CHARS}), char_length(payload) \
                 FROM {dead} WHERE {filter} ORDER BY failed_at, event_id LIMIT $2"
            ),
            &[&since, &limit],
        )
        .map_err(|e| database(&e))?;
    tx.commit().map_err(|e| database(&e))?;
    let reasons: Vec<(String, i64)> = reasons.iter().map(|r| (r.get(0), r.get(1))).collect();
    let time = |t: Option<SystemTime>| t.map(rfc3339);
    if json {
        let letters: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let payload: Option<String> = r.get(7);
                let chars: Option<i32> = r.get(8);
                serde_json::json!({
                    "event_id": r.get::<_, Option<String>>(0),
                    "device_id": r.get::<_, Option<String>>(1),
                    "type": r.get::<_, Option<String>>(2),
                    "ts": time(r.get(3)),
                    "received_at": time(r.get(4)),
                    "failed_at": time(r.get(5)),
                    "error": r.get::<_, String>(6),
                    "payload": payload,
                    "payload_chars": chars,
                    "payload_truncated": chars.is_some_and(|c| c > JSON_PAYLOAD_CHARS),
                })
            })
            .collect();
        let v = serde_json::json!({
            "table": dead,
            "total": total,
            "matching": matching,
            "shown": letters.len(),
            "by_reason": reasons.iter().map(|(e, n)| serde_json::json!({"error": e, "count": n})).collect::<Vec<_>>(),
            "dead_letters": letters,
        });
        let _ = writeln!(out, "{v}");
        return Ok(());
    }
    let _ = write!(out, "{total} dead letters waiting in {dead}");
    if let Some(t) = since {
        let _ = write!(out, ", {matching} failed since {}", rfc3339(t));
    }
    let _ = writeln!(out);
    if !reasons.is_empty() {
        let _ = writeln!(out, "by reason:");
        for (error, n) in &reasons {
            let _ = writeln!(out, "  {n:>8}  {error}");
        }
    }
    for r in &rows {
        let text = |i: usize| r.get::<_, Option<String>>(i).unwrap_or_else(|| "NULL".into());
        let when = |i: usize| time(r.get(i)).unwrap_or_else(|| "NULL".into());
        let payload: Option<String> = r.get(7);
        let payload = match &payload {
            Some(p) => {
                let (shown, was_cut) = cut(p, TEXT_PAYLOAD_CHARS);
                format!("{shown}{}", if was_cut { " …" } else { "" })
            }
            None => "NULL".into(),
        };
        let _ = writeln!(
            out,
            "{}  failed {}  device {}  type {}  ts {}\n    error: {}\n    payload: {payload}",
            text(0),
            when(5),
            text(1),
            text(2),
            when(3),
            r.get::<_, String>(6),
        );
    }
    let _ = writeln!(out, "shown {} of {matching}", rows.len());
    Ok(())
}

/// What `replay` was asked.
struct ReplayOptions<'a> {
    limit: Option<u64>,
    ids: &'a [String],
    dry_run: bool,
    /// `database.create_table`: make missing tables, as start-up does.
    create: bool,
}

/// What `replay` did.
#[derive(Default)]
struct Tally {
    examined: u64,
    /// Stored now (new in the events table).
    replayed: u64,
    /// Already in the events table: only the letter was removed.
    already: u64,
    /// Still refused, by reason.
    failing: BTreeMap<String, u64>,
}

impl Tally {
    fn still_failing(&self) -> u64 {
        self.failing.values().sum()
    }

    fn render(&self, sql: &Statements, remaining: Option<u64>, dry_run: bool, json: bool, out: &mut String) {
        if json {
            let v = serde_json::json!({
                "table": sql.dead_letter_table,
                "dry_run": dry_run,
                "examined": self.examined,
                "replayed": self.replayed,
                "already_present": self.already,
                "still_failing": self.still_failing(),
                "failing_by_reason": self.failing.iter().map(|(e, n)| serde_json::json!({"error": e, "count": n})).collect::<Vec<_>>(),
                "remaining": remaining,
            });
            let _ = writeln!(out, "{v}");
            return;
        }
        let would = if dry_run { "dry run, nothing changed: would have " } else { "" };
        let remaining = remaining.map_or_else(|| "unknown".to_string(), |n| n.to_string());
        let _ = writeln!(
            out,
            "{would}replayed {} (stored now), already present {} (letter removed), still failing {}; \
             examined {}; remaining {remaining} in {}",
            self.replayed,
            self.already,
            self.still_failing(),
            self.examined,
            sql.dead_letter_table
        );
        if !self.failing.is_empty() {
            let _ = writeln!(out, "still failing, by reason:");
            for (error, n) in &self.failing {
                let _ = writeln!(out, "  {n:>8}  {error}");
            }
        }
    }
}

/// One dead letter, as read for a replay.
struct Letter {
    event_id: String,
    device_id: Option<String>,
    event_type: Option<String>,
    ts: Option<SystemTime>,
    received_at: Option<SystemTime>,
    payload: Option<String>,
}

/// A letter that passed validation: its COPY tuple.
struct Valid {
    event_id: String,
    row: RowBuf,
}

fn replay(
    client: &mut Client,
    sql: &Statements,
    parser: &mut Parser,
    options: &ReplayOptions<'_>,
    tally: &mut Tally,
) -> Result<(), Failure> {
    db::prepare_table_raw(client, sql, options.create, sql.statement_timeout_ms).map_err(|e| database(&e))?;
    let mut after = String::new();
    loop {
        let budget = options.limit.map_or(PAGE as u64, |l| l.saturating_sub(tally.examined).min(PAGE as u64));
        if budget == 0 {
            return Ok(());
        }
        let page = read_page(client, sql, &after, options.ids, budget)?;
        let Some(last) = page.last() else { return Ok(()) };
        after = last.event_id.clone();
        tally.examined += page.len() as u64;
        let mut valid = Vec::with_capacity(page.len());
        let mut failing: Vec<(String, String)> = Vec::new();
        for letter in page {
            match revalidate(parser, &letter) {
                Ok(row) => valid.push(Valid { event_id: letter.event_id, row }),
                Err(why) => failing.push((letter.event_id, format!("ingestd validation (replay): {why}"))),
            }
        }
        // Byte order, as the writers stream rows: transactions that share
        // ids take their index locks in one order.
        valid.sort_unstable_by(|a, b| a.event_id.cmp(&b.event_id));
        let mut parts: Vec<&[Valid]> = vec![&valid];
        while let Some(part) = parts.pop() {
            if part.is_empty() {
                continue;
            }
            match write_part(client, sql, part, options.dry_run) {
                Ok(done) => {
                    tally.replayed += done.inserted;
                    tally.already += (part.len() as u64).saturating_sub(done.inserted);
                }
                Err(e) if e.is_transient() => {
                    record_failures(client, sql, &failing, options.dry_run, tally)?;
                    return Err(Failure::Database(format!("stopped: {e}")));
                }
                Err(e) if part.len() == 1 => failing.push((part[0].event_id.clone(), e.message().to_string())),
                Err(_) => {
                    let (left, right) = part.split_at(part.len() / 2);
                    parts.push(right);
                    parts.push(left);
                }
            }
        }
        record_failures(client, sql, &failing, options.dry_run, tally)?;
    }
}

/// The next page of letters after `after` (one per `event_id`: its latest
/// failure), at most `limit`, only `ids` when given.
fn read_page(
    client: &mut Client,
    sql: &Statements,
    after: &str,
    ids: &[String],
    limit: u64,
) -> Result<Vec<Letter>, Failure> {
    let ids: Option<Vec<&str>> = (!ids.is_empty()).then(|| ids.iter().map(String::as_str).collect());
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let query = format!(
        "SELECT DISTINCT ON (event_id) event_id, device_id, event_type, ts, received_at, payload \
         FROM {} WHERE event_id > $1 AND ($2::text[] IS NULL OR event_id = ANY($2)) \
         ORDER BY event_id, failed_at DESC LIMIT $3",
        sql.dead_letter_table
    );
    let mut tx = Tx::begin(client, sql.statement_timeout_ms).map_err(|e| database(&e))?;
    let params: [&(dyn ToSql + Sync); 3] = [&after, &ids, &limit];
    let rows = tx.query(&query, &params).map_err(|e| database(&e))?;
    tx.commit().map_err(|e| database(&e))?;
    Ok(rows
        .iter()
        .map(|r| Letter {
            event_id: r.get(0),
            device_id: r.get(1),
            event_type: r.get(2),
            ts: r.get(3),
            received_at: r.get(4),
            payload: r.get(5),
        })
        .collect())
}

fn unix_micros(t: SystemTime) -> Option<i64> {
    i64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_micros()).ok()
}

/// The letter back as the event a client sent, through the ingest parser
/// with the clock at its `received_at` (module docs); its COPY tuple, or
/// why it is refused.
fn revalidate(parser: &mut Parser, letter: &Letter) -> Result<RowBuf, String> {
    let (Some(device_id), Some(event_type), Some(ts), Some(received_at)) =
        (&letter.device_id, &letter.event_type, letter.ts, letter.received_at)
    else {
        return Err("the dead letter lacks device_id, event_type, ts or received_at".into());
    };
    let (Some(ts_us), Some(received_us)) = (unix_micros(ts), unix_micros(received_at)) else {
        return Err("ts or received_at is before 1970".into());
    };
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let ts = chrono::DateTime::from_timestamp_micros(ts_us)
        .ok_or("ts out of range")?
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mut body = format!(
        "{{\"event_id\":{},\"device_id\":{},\"type\":{},\"ts\":\"{ts}\"",
        quote(&letter.event_id),
        quote(device_id),
        quote(event_type)
    );
    if let Some(payload) = &letter.payload {
        let _ = write!(body, ",\"payload\":{payload}");
    }
    body.push('}');
    let parsed = parser
        .parse(body.as_bytes(), BodyKind::Single, Clock { now_unix_us: received_us })
        .map_err(|e| e.to_string())?;
    if let Some(r) = parsed.rejected.first() {
        return Err(r.error.to_string());
    }
    (parsed.rows.len() == 1 && parsed.rows.event_id(0) == letter.event_id.as_bytes())
        .then_some(parsed.rows)
        .ok_or_else(|| "the event did not parse back to one row with its event_id".into())
}

/// One transaction: the rows through staging (`ON CONFLICT DO NOTHING`),
/// their state, and their letters deleted; rolled back on a dry run.
/// Retried at once a few times after a conflict (deadlock) with a writer.
fn write_part(client: &mut Client, sql: &Statements, part: &[Valid], dry_run: bool) -> Result<Committed, WriteError> {
    let none = |_: &mut dyn std::io::Write| Ok(());
    let rows = |out: &mut dyn std::io::Write| part.iter().try_for_each(|v| out.write_all(v.row.row(0)));
    let state = |done: &Committed| done.latest_state(part.iter().map(|v| (v.row.row(0), v.row.event_id(0), false)));
    let ids: Vec<&str> = part.iter().map(|v| v.event_id.as_str()).collect();
    let delete = format!("DELETE FROM {} WHERE event_id = ANY($1)", sql.dead_letter_table);
    let mut finish = |tx: &mut Tx<'_>, _: &Committed| -> Result<Ending, postgres::Error> {
        if dry_run {
            return Ok(Ending::Rollback);
        }
        tx.execute(&delete, &[&ids])?;
        Ok(Ending::Commit)
    };
    let mut attempt = 0;
    loop {
        match db::copy_batch_with(client, sql, &none, Some(&rows), Some(&state), Some(&mut finish)) {
            Err(WriteError::Conflict(_)) if attempt < 5 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(5 * attempt));
            }
            other => return other,
        }
    }
}

/// Counts the refused letters and (unless a dry run) records their new
/// reason, in one transaction.
fn record_failures(
    client: &mut Client,
    sql: &Statements,
    failing: &[(String, String)],
    dry_run: bool,
    tally: &mut Tally,
) -> Result<(), Failure> {
    for (_, why) in failing {
        *tally.failing.entry(why.clone()).or_default() += 1;
    }
    if dry_run || failing.is_empty() {
        return Ok(());
    }
    let update =
        format!("UPDATE {} SET error = $2 WHERE event_id = $1 AND error IS DISTINCT FROM $2", sql.dead_letter_table);
    let mut tx = Tx::begin(client, sql.statement_timeout_ms).map_err(|e| database(&e))?;
    let statement = tx.prepare(&update).map_err(|e| database(&e))?;
    for (id, why) in failing {
        tx.execute(&statement, &[id, why]).map_err(|e| database(&e))?;
    }
    drop(statement);
    tx.commit().map_err(|e| database(&e))
}

fn purge(client: &mut Client, sql: &Statements, scope: &Scope, json: bool, out: &mut String) -> Result<(), Failure> {
    let dead = &sql.dead_letter_table;
    let ids: Vec<&str> = match scope {
        Scope::Ids(ids) => ids.iter().map(String::as_str).collect(),
        _ => Vec::new(),
    };
    let (filter, value): (&str, Option<&(dyn ToSql + Sync)>) = match scope {
        Scope::All => ("true", None),
        Scope::Before(t) => ("failed_at < $2", Some(t)),
        Scope::Ids(_) => ("event_id = ANY($2)", Some(&ids)),
    };
    // By ctid (the table has no key): each chunk deletes the rows it has
    // just selected, so no transaction holds more than PURGE_CHUNK.
    let delete = format!("DELETE FROM {dead} WHERE ctid IN (SELECT ctid FROM {dead} WHERE {filter} LIMIT $1)");
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&PURGE_CHUNK];
    params.extend(value);
    let mut purged = 0u64;
    loop {
        let mut tx = Tx::begin(client, sql.statement_timeout_ms).map_err(|e| database(&e))?;
        let n = tx.execute(&delete, &params).map_err(|e| database(&e))?;
        tx.commit().map_err(|e| database(&e))?;
        purged += n;
        if n < PURGE_CHUNK as u64 {
            break;
        }
    }
    let remaining = count(client, sql)?;
    if json {
        let _ = writeln!(out, "{}", serde_json::json!({"table": dead, "purged": purged, "remaining": remaining}));
    } else {
        let _ = writeln!(out, "purged {purged} dead letters; {remaining} remaining in {dead}");
    }
    Ok(())
}

/// Prints `ran`'s output (stdout) and error (stderr); gives its exit code.
pub fn print(ran: &Ran) -> u8 {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(ran.output.as_bytes());
    let _ = stdout.flush();
    if let Some(why) = &ran.error {
        eprintln!("ingestd dead-letter: {why}");
    }
    ran.code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &str) -> Result<Command, String> {
        let v: Vec<String> = words.split_whitespace().map(String::from).collect();
        parse_args(&v, UNIX_EPOCH + Duration::from_secs(1_000_000))
    }

    #[test]
    fn purge_everything_needs_yes() {
        assert!(args("purge --all").unwrap_err().contains("--yes"));
        assert_eq!(args("purge --all --yes").unwrap(), Command::Purge { scope: Scope::All, json: false });
        assert!(args("purge").is_err());
        assert!(args("purge --all --yes --id x").is_err());
        assert_eq!(
            args("purge --id a --id=b").unwrap(),
            Command::Purge { scope: Scope::Ids(vec!["a".into(), "b".into()]), json: false }
        );
    }

    #[test]
    fn times_and_limits() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(parse_time("--since", "2h", now).unwrap(), now - Duration::from_secs(7_200));
        assert_eq!(parse_time("--since", "1970-01-02", now).unwrap(), UNIX_EPOCH + Duration::from_secs(86_400));
        assert_eq!(parse_time("--since", "1970-01-01T00:01:00Z", now).unwrap(), UNIX_EPOCH + Duration::from_secs(60));
        assert!(parse_time("--since", "yesterday", now).is_err());
        assert!(args("list --limit 0").is_err());
        assert!(args("list --limit 10001").is_err());
        assert!(args("replay --all").is_err());
        assert!(args("frobnicate").is_err());
        assert_eq!(
            args("replay --limit 5 --dry-run --id e1").unwrap(),
            Command::Replay { limit: Some(5), ids: vec!["e1".into()], dry_run: true, json: false }
        );
    }

    #[test]
    fn revalidation_rebuilds_the_original_row() {
        let rules = Rules {
            max_events: 10,
            max_payload_bytes: 1024,
            max_payload_depth: 8,
            max_future_skew_us: 1_000_000,
            allow_unknown_fields: false,
        };
        let mut parser = Parser::new(rules);
        let received = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let letter = Letter {
            event_id: "e-1".into(),
            device_id: Some("d \"q\"".into()),
            event_type: Some("t".into()),
            ts: Some(received + Duration::from_micros(500_123)),
            received_at: Some(received),
            payload: Some("{\"v\": 1.50}".into()),
        };
        let rows = revalidate(&mut parser, &letter).unwrap();
        let v = rows.view(0).unwrap();
        assert_eq!(v.device_id, b"d \"q\"");
        assert_eq!(v.payload, Some(&b"{\"v\": 1.50}"[..]));
        assert_eq!(v.received_at, crate::row::pg_micros_from_unix_micros(1_800_000_000_000_000));
        assert_eq!(v.ts - v.received_at, 500_123);
        // A payload that is not one JSON value, or a ts past the skew as of
        // its receipt, is refused with the parser's reason.
        let bad = Letter { payload: Some("{\"v\": }".into()), ..letter };
        assert!(revalidate(&mut parser, &bad).unwrap_err().contains("malformed"));
        let late = Letter { payload: None, ts: Some(received + Duration::from_secs(5)), ..bad };
        assert!(revalidate(&mut parser, &late).unwrap_err().contains("ahead"));
    }
}
