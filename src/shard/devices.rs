//! `GET /devices/{device_id}` and `GET /devices?prefix=&since=&limit=&after=`:
//! the latest state of devices (`[state]`), read by the readers
//! ([`crate::read`]) and awaited here without blocking the shard.
//!
//! The parameters are checked here, before anything is queued: a bad one is
//! 400 naming it (`"parameter"` in the body), as is an unknown or repeated
//! one (a repeated parameter is never silently replaced). An empty value is
//! the same as leaving the parameter out. A token with a `device_prefix`
//! reads only its own devices, as it writes and subscribes only to them: a
//! device outside it is 403 (whether or not it exists, so the answer leaks
//! nothing), a list is narrowed to the token's prefix, and a `prefix`
//! outside it is 403.
//!
//! With `[state]` off there is nothing to read: 404 saying how to turn it on.
//!
//! [`read`] (health and breaker checks, the answer's lease, the hand-off
//! and the bounded wait) also serves WebSocket snapshots (`ws`).

use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::ShardCtx;
use super::http::{RequestHead, Response};
use crate::auth::Grant;
use crate::breaker::Admission;
use crate::ingest::event::MAX_ID_BYTES;
use crate::labels::{Route, Shed};
use crate::read::{DeviceFilter, Query, ROW_OVERHEAD_BYTES, ReadError, Refused};

/// `limit` when the request gives none.
pub const DEFAULT_LIMIT: usize = 100;

/// The 404 with `[state]` off.
pub const STATE_OFF: &str =
    "device state is off: set [state] enabled = true (or --set state.enabled=true) to keep and serve it";

/// A parameter that is wrong, and what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadParam {
    pub name: String,
    pub message: String,
}

impl BadParam {
    fn new(name: &str, message: impl Into<String>) -> BadParam {
        BadParam { name: name.to_string(), message: message.into() }
    }

    fn response(&self) -> Response {
        let body = serde_json::json!({ "error": self.message, "parameter": self.name });
        Response::json(400, body.to_string())
    }
}

/// A `GET /devices` request's parameters, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListParams {
    pub prefix: Option<String>,
    pub since: Option<SystemTime>,
    pub limit: usize,
    pub after: Option<String>,
}

/// The `device_id` of `/devices/{device_id}` (percent-decoded; a `/` in
/// an id may be sent as is or as `%2F`), with the rules of an event's
/// `device_id`. No query parameters are taken.
pub fn device_path(target: &str) -> Result<String, BadParam> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if let Some((name, _)) = form_urlencoded::parse(query.as_bytes()).next() {
        return Err(BadParam::new(
            &name,
            format!("unknown query parameter `{name}`; GET /devices/{{device_id}} takes none"),
        ));
    }
    let raw = path.strip_prefix("/devices/").unwrap_or_default();
    let id = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| BadParam::new("device_id", "device_id is not valid UTF-8 once percent-decoded"))?;
    check_id("device_id", &id)?;
    Ok(id.into_owned())
}

/// 1–128 bytes, no NUL: what an event's `device_id` may be.
fn check_id(name: &str, id: &str) -> Result<(), BadParam> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(BadParam::new(name, format!("{name} must be 1-{MAX_ID_BYTES} bytes (a device_id)")));
    }
    if id.contains('\0') {
        return Err(BadParam::new(name, format!("{name} contains a NUL character, which no device_id has")));
    }
    Ok(())
}

/// `prefix`, `since` (RFC 3339, or epoch milliseconds like an event's
/// `ts`), `limit` (1 to `max_page`, default [`DEFAULT_LIMIT`]), `after`.
pub fn list_params(target: &str, max_page: usize) -> Result<ListParams, BadParam> {
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let mut p = ListParams { prefix: None, since: None, limit: DEFAULT_LIMIT, after: None };
    let mut seen: Vec<&'static str> = Vec::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let name = match &*key {
            "prefix" => "prefix",
            "since" => "since",
            "limit" => "limit",
            "after" => "after",
            other => {
                return Err(BadParam::new(
                    other,
                    format!("unknown query parameter `{other}`; use prefix, since, limit, after"),
                ));
            }
        };
        if seen.contains(&name) {
            return Err(BadParam::new(name, format!("{name} is given more than once")));
        }
        seen.push(name);
        if value.is_empty() {
            continue;
        }
        match name {
            "prefix" => {
                check_id("prefix", &value)?;
                p.prefix = Some(value.into_owned());
            }
            "after" => {
                check_id("after", &value)?;
                p.after = Some(value.into_owned());
            }
            "limit" => {
                p.limit = value.parse().ok().filter(|n| (1..=max_page).contains(n)).ok_or_else(|| {
                    BadParam::new("limit", format!("limit must be an integer from 1 to {max_page} (state.max_page)"))
                })?;
            }
            _ => p.since = Some(since(&value)?),
        }
    }
    Ok(p)
}

fn since(value: &str) -> Result<SystemTime, BadParam> {
    let bad = || {
        BadParam::new(
            "since",
            "since must be an RFC 3339 timestamp (e.g. 2026-01-02T03:04:05Z) or integer epoch milliseconds",
        )
    };
    if value.bytes().all(|b| b.is_ascii_digit()) {
        let ms: u64 = value.parse().map_err(|_| bad())?;
        return UNIX_EPOCH.checked_add(Duration::from_millis(ms)).ok_or_else(bad);
    }
    let t = chrono::DateTime::parse_from_rfc3339(value).map_err(|_| bad())?;
    Ok(t.with_timezone(&chrono::Utc).into())
}

/// The prefix a token may list: the request's narrowed to the token's.
/// `Err` when they are disjoint.
pub fn narrow(prefix: Option<String>, token_prefix: &str) -> Result<Option<String>, String> {
    if token_prefix.is_empty() {
        return Ok(prefix);
    }
    match prefix {
        None => Ok(Some(token_prefix.to_string())),
        Some(p) if p.starts_with(token_prefix) => Ok(Some(p)),
        Some(p) if token_prefix.starts_with(&p) => Ok(Some(token_prefix.to_string())),
        Some(p) => Err(p),
    }
}

fn outside_prefix(grant: &Grant) -> Response {
    Response::error(403, &format!("{} may only read device_ids starting with {:?}", grant.label(), grant.device_prefix))
}

/// Answers a `/devices…` request.
pub async fn handle(ctx: &ShardCtx, head: &RequestHead, grant: Option<&Grant>) -> Response {
    if ctx.readers.is_none() {
        return Response::error(404, STATE_OFF);
    }
    let max_page = ctx.config().state.max_page;
    let target = head.path.as_deref().unwrap_or_default();
    let token_prefix = grant.map_or("", |g| &*g.device_prefix);
    let query = if head.target == Route::Device {
        let id = match device_path(target) {
            Ok(id) => id,
            Err(bad) => return bad.response(),
        };
        if let Some(g) = grant
            && !g.owns_device(id.as_bytes())
        {
            return outside_prefix(g);
        }
        Query::Device(id)
    } else {
        let p = match list_params(target, max_page) {
            Ok(p) => p,
            Err(bad) => return bad.response(),
        };
        let prefix = match narrow(p.prefix, token_prefix) {
            Ok(prefix) => prefix,
            Err(p) => {
                let who = grant.map_or_else(|| "this token".to_string(), Grant::label);
                return Response::error(
                    403,
                    &format!(
                        "{who} may only read device_ids starting with {token_prefix:?}; prefix {p:?} is outside it"
                    ),
                );
            }
        };
        Query::Page(DeviceFilter {
            prefixes: prefix.into_iter().collect(),
            since: p.since,
            after: p.after,
            limit: p.limit,
            ..DeviceFilter::default()
        })
    };
    let wanted = match &query {
        Query::Device(id) => Some(id.clone()),
        Query::Page(_) => None,
    };
    match read(ctx, query).await {
        Ok(Some(answer)) => {
            let mut r = Response::json(200, answer.body);
            r.held = Some(Rc::new(answer.lease));
            r
        }
        Ok(None) => Response::error(
            404,
            &format!(
                "no state for device_id {:?}: no event of it has been stored since [state] was enabled",
                wanted.unwrap_or_default()
            ),
        ),
        Err(failed) => failed.response(ctx.config().server.retry_after_s),
    }
}

/// Why a read of device state has no answer, as a client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadFailed {
    /// 404 (state off), 500 (PostgreSQL refused the query) or 503 (a retry
    /// may help: the database is down, the readers busy, the time up).
    pub status: u16,
    pub message: String,
}

impl ReadFailed {
    fn new(status: u16, message: impl Into<String>) -> ReadFailed {
        ReadFailed { status, message: message.into() }
    }

    /// The HTTP answer (503s carry `Retry-After`).
    pub fn response(&self, retry_after_s: u32) -> Response {
        let r = Response::error(self.status, &self.message);
        if self.status == 503 { r.retry_after(retry_after_s) } else { r }
    }
}

/// Reads device state through the readers without blocking the shard:
/// checks the database's health and the breaker first, leases the answer's
/// bytes, queues the query and awaits it within `state.read_timeout_ms`.
/// `Ok(None)`: [`Query::Device`] found no such device. `GET /devices…` and
/// WebSocket snapshots (`shard::snapshot`) both read through here.
pub async fn read(ctx: &ShardCtx, query: Query) -> Result<Option<crate::read::Answer>, ReadFailed> {
    let Some(readers) = ctx.readers.as_ref() else {
        return Err(ReadFailed::new(404, STATE_OFF));
    };
    let (timeout, max_answer, row_bytes) = {
        let c = ctx.config();
        (
            Duration::from_millis(c.state.read_timeout_ms),
            c.state.max_answer_bytes,
            c.ingest.max_payload_bytes + ROW_OVERHEAD_BYTES,
        )
    };
    let unavailable = |why: Option<Shed>, message: &str| {
        if let Some(why) = why {
            ctx.stats().shed(why);
        }
        ReadFailed::new(503, message)
    };
    // What the probe last saw: a read of a database known to be down would
    // only wait for a connection until its deadline.
    if !ctx.health.database.is_up() {
        let status = ctx.health.database.status().as_str();
        return Err(unavailable(None, &format!("database {status}; retry later")));
    }
    if let Admission::Rejected { retry_after } = ctx.health.breaker.admit(Instant::now()) {
        return Err(unavailable(
            Some(Shed::BreakerOpen),
            &format!("database unavailable (circuit breaker open); retry in {} ms", retry_after.as_millis().max(1)),
        ));
    }
    let rows = match &query {
        Query::Device(_) => 1,
        Query::Page(f) => f.limit,
    };
    let lease = ctx.budget.try_lease(rows.saturating_mul(row_bytes).min(max_answer)).map_err(|e| {
        unavailable(Some(Shed::MemoryBudget), &format!("server is over its memory budget ({}); retry later", e.key))
    })?;
    let deadline = Instant::now() + timeout;
    let wait = match readers.try_submit(query, deadline, lease) {
        Ok(wait) => wait,
        Err(Refused::Busy) => {
            return Err(unavailable(Some(Shed::ReadersBusy), "every reader is busy (state.readers); retry later"));
        }
        Err(Refused::Closed) => return Err(unavailable(Some(Shed::ShuttingDown), "shutting down; retry later")),
    };
    let answered = monoio::select! {
        r = wait => Some(r),
        _ = monoio::time::sleep(deadline.saturating_duration_since(Instant::now())) => None,
    };
    match answered {
        None | Some(Ok(Err(ReadError::Expired))) => Err(unavailable(
            Some(Shed::ReadTimeout),
            &format!(
                "the read was not answered within state.read_timeout_ms ({} ms); retry later",
                timeout.as_millis()
            ),
        )),
        Some(Err(_canceled)) => Err(unavailable(None, "the reader stopped before answering; retry")),
        Some(Ok(Ok(answer))) => Ok(answer),
        Some(Ok(Err(ReadError::Unavailable(why)))) => Err(unavailable(None, &format!("database unavailable: {why}"))),
        Some(Ok(Err(ReadError::Failed(why)))) => {
            Err(ReadFailed::new(500, format!("PostgreSQL refused the read: {why}")))
        }
        Some(Ok(Err(ReadError::OverBudget(key)))) => Err(unavailable(
            Some(Shed::MemoryBudget),
            &format!("server is over its memory budget ({key}); retry later"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(r: Result<impl std::fmt::Debug, BadParam>) -> String {
        r.unwrap_err().name
    }

    #[test]
    fn a_device_path_is_percent_decoded_and_checked() {
        assert_eq!(device_path("/devices/fleet-7%2F3").unwrap(), "fleet-7/3");
        assert_eq!(device_path("/devices/fleet-7/3").unwrap(), "fleet-7/3");
        assert_eq!(device_path("/devices/caf%C3%A9%20x").unwrap(), "café x");
        assert_eq!(bad(device_path("/devices/")), "device_id");
        assert_eq!(bad(device_path("/devices/a%00b")), "device_id");
        assert_eq!(bad(device_path("/devices/%FF")), "device_id");
        assert_eq!(bad(device_path(&format!("/devices/{}", "x".repeat(129)))), "device_id");
        assert_eq!(bad(device_path("/devices/a?limit=1")), "limit");
    }

    #[test]
    fn list_parameters_have_defaults_and_bounds() {
        let p = list_params("/devices", 1000).unwrap();
        assert_eq!(p, ListParams { prefix: None, since: None, limit: DEFAULT_LIMIT, after: None });
        let p =
            list_params("/devices?prefix=fleet-7%2F&limit=5&after=fleet-7%2F2&since=2026-01-02T03:04:05Z", 10).unwrap();
        assert_eq!((p.prefix.as_deref(), p.limit, p.after.as_deref()), (Some("fleet-7/"), 5, Some("fleet-7/2")));
        assert_eq!(p.since, Some(UNIX_EPOCH + Duration::from_secs(1_767_323_045)));
        let ms = list_params("/devices?since=1767323045000", 10).unwrap();
        assert_eq!(ms.since, p.since, "epoch milliseconds, like an event's ts");
        assert_eq!(list_params("/devices?prefix=&limit=", 10).unwrap().limit, DEFAULT_LIMIT, "empty = absent");
    }

    #[test]
    fn every_bad_parameter_is_named() {
        for (query, name) in [
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=-1", "limit"),
            ("limit=ten", "limit"),
            ("since=garbage", "since"),
            ("since=2026-13-01T00:00:00Z", "since"),
            ("after=a%00", "after"),
            ("prefix=a%00", "prefix"),
            ("type=gps", "type"),
            ("limit=1&limit=2", "limit"),
        ] {
            assert_eq!(bad(list_params(&format!("/devices?{query}"), 1000)), name, "{query}");
        }
        let long = format!("/devices?after={}", "x".repeat(129));
        let e = list_params(&long, 1000).unwrap_err();
        assert_eq!(e.name, "after");
        assert!(e.message.contains("1-128 bytes"), "{}", e.message);
    }

    #[test]
    fn a_token_prefix_narrows_the_list() {
        assert_eq!(narrow(None, ""), Ok(None));
        assert_eq!(narrow(Some("x".into()), ""), Ok(Some("x".into())));
        assert_eq!(narrow(None, "fleet-a/"), Ok(Some("fleet-a/".into())));
        assert_eq!(narrow(Some("fleet-a/7".into()), "fleet-a/"), Ok(Some("fleet-a/7".into())));
        assert_eq!(narrow(Some("fleet".into()), "fleet-a/"), Ok(Some("fleet-a/".into())));
        assert_eq!(narrow(Some("fleet-b/".into()), "fleet-a/"), Err("fleet-b/".into()));
    }
}
