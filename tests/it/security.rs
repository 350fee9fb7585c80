//! Security features: bearer tokens with scopes and device prefixes
//! (`[auth]`), token-file reload on SIGHUP, a TLS listener beside the plain
//! one (`[tls]`), abuse limits per IP and per token (`[limits]`), and the
//! write timeout for clients that never read (`server.write_timeout_ms`).
//!
//! Interface, as these tests read it:
//! - `auth.mode = "tokens"`: every route but `GET /health` needs
//!   `Authorization: Bearer <token>` (`GET /ws` also takes `?access_token=`).
//!   Missing/malformed/unknown → 401 + `WWW-Authenticate: Bearer` + JSON
//!   error; a token without the scope → 403 with a JSON error naming it.
//!   Scopes: ingest (POST /events, /events/batch, WS ingest frames),
//!   subscribe (GET /ws), admin (GET /stats, /metrics). `GET /ws` with
//!   `subscribe=false` needs `ingest` instead.
//! - `device_prefix`: ingest of any event outside it → 403, nothing stored;
//!   a subscription filter outside it → 403; no filter → only its devices.
//! - Tokens never appear in logs; `/health` says `"auth": "off"|"tokens"`.
//! - `[tls]`: `ingestd listening on https://ADDR` on stdout, before the
//!   plain readiness line; a bad certificate is exit 64 naming `tls.cert_file`.
//! - `[limits]`: over a limit → 429 + `Retry-After` (integer seconds >= 1)
//!   + JSON error; `max_connections_per_ip` answers 429 and closes.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

use crate::support::*;

const CLI_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// One `[[auth.tokens]]` entry.
struct Tok {
    token: String,
    scopes: &'static [&'static str],
    prefix: &'static str,
    name: &'static str,
}

impl Tok {
    fn new(name: &'static str, scopes: &'static [&'static str]) -> Tok {
        Tok { token: secret_token(name), scopes, prefix: "", name }
    }
    fn prefix(mut self, prefix: &'static str) -> Tok {
        self.prefix = prefix;
        self
    }
    fn toml(&self, table: &str) -> String {
        let scopes: Vec<String> = self.scopes.iter().map(|s| format!("\"{s}\"")).collect();
        format!(
            "[[{table}]]\ntoken = \"{}\"\nscopes = [{}]\ndevice_prefix = \"{}\"\nname = \"{}\"\n\n",
            self.token,
            scopes.join(", "),
            self.prefix,
            self.name
        )
    }
}

/// A config file with `[auth] mode = "tokens"`, these tokens and `extra` TOML.
fn auth_config(tokens: &[&Tok], extra: &str) -> String {
    let mut text = format!("{extra}\n[auth]\nmode = \"tokens\"\n\n");
    for t in tokens {
        text.push_str(&t.toml("auth.tokens"));
    }
    temp_file("auth.toml", &text).display().to_string()
}

fn with_tokens(tokens: &[&Tok]) -> Ingestd {
    Ingestd::new().config_file(&auth_config(tokens, ""))
}

/// A 401: JSON error and a `WWW-Authenticate: Bearer ...` challenge.
fn assert_401(resp: &Response, what: &str) {
    assert_eq!(resp.status, 401, "{what}:\n{resp:?}");
    assert_error(resp, 401);
    let challenge = resp.header("www-authenticate").unwrap_or_else(|| panic!("{what}: no WWW-Authenticate:\n{resp:?}"));
    assert!(challenge.to_ascii_lowercase().starts_with("bearer"), "{what}: challenge {challenge:?}");
}

/// A 403 whose JSON error names `scope`.
fn assert_403(resp: &Response, scope: &str, what: &str) {
    assert_eq!(resp.status, 403, "{what}:\n{resp:?}");
    let msg = assert_error(resp, 403);
    assert!(msg.contains(scope), "{what}: the 403 does not name `{scope}`: {msg:?}");
}

/// A 429 with an integer `Retry-After` of at least 1 and a JSON error; the seconds.
fn assert_429(resp: &Response, what: &str) -> u64 {
    assert_eq!(resp.status, 429, "{what}:\n{resp:?}");
    assert_error(resp, 429);
    let ra = resp.header("retry-after").unwrap_or_else(|| panic!("{what}: 429 without Retry-After:\n{resp:?}"));
    let secs: u64 = ra.parse().unwrap_or_else(|_| panic!("{what}: Retry-After {ra:?} is not integer seconds"));
    assert!(secs >= 1, "{what}: Retry-After {secs}");
    secs
}

fn ev(id: &str, device: &str) -> Value {
    json!({"event_id": id, "device_id": device, "type": "t", "ts": now_ms(), "payload": {"id": id}})
}

fn post_event_as(s: &Server, token: &str, event: &Value) -> Response {
    s.send(&Req::post("/events").json(event).bearer(token))
}

fn post_batch_as(s: &Server, token: &str, events: &[Value]) -> Response {
    s.send(&Req::post("/events/batch").json(&Value::Array(events.to_vec())).bearer(token))
}

type Ws = WebSocket<TcpStream>;

/// A WebSocket upgrade to `/ws{query}`, with an `Authorization` header if
/// `bearer` is given; `Err(status)` when refused.
fn ws_upgrade(s: &Server, query: &str, bearer: Option<&str>) -> Result<Ws, u16> {
    let stream = TcpStream::connect(s.addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut request = format!("ws://{}/ws{query}", s.addr).into_client_request().unwrap();
    if let Some(token) = bearer {
        request.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
    }
    match tungstenite::client(request, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => Err(resp.status().as_u16()),
        Err(e) => panic!("WebSocket upgrade {query}: {e}"),
    }
}

fn ws_ok(s: &Server, query: &str, bearer: Option<&str>) -> Ws {
    ws_upgrade(s, query, bearer).unwrap_or_else(|status| panic!("upgrade {query} refused with {status}"))
}

// ---------------------------------------------------------------------------
// Tokens and scopes
// ---------------------------------------------------------------------------

#[test]
fn health_needs_no_token_and_reports_the_auth_mode() {
    let open = Server::start();
    let h = open.get("/health");
    assert_eq!(h.status, 200, "{h:?}");
    assert_eq!(h.json()["auth"], "off", "{h:?}");

    let t = Tok::new("ingest", &["ingest"]);
    let s = with_tokens(&[&t]).start();
    let h = s.get("/health");
    assert_eq!(h.status, 200, "GET /health without a token:\n{h:?}");
    assert_eq!(h.json()["auth"], "tokens", "{h:?}");
}

#[test]
fn missing_malformed_and_unknown_tokens_are_401() {
    let admin = Tok::new("admin", &["ingest", "subscribe", "admin"]);
    let s = with_tokens(&[&admin]).start();
    let real = admin.token.as_str();
    let id = unique("unauth");
    let body = serde_json::to_vec(&ev(&id, "d")).unwrap();
    let batch = serde_json::to_vec(&json!([ev(&id, "d")])).unwrap();
    let requests = || {
        vec![
            Req::post("/events").header("Content-Type", "application/json").body(body.clone()),
            Req::post("/events/batch").header("Content-Type", "application/json").body(batch.clone()),
            Req::get("/stats"),
            Req::get("/metrics"),
        ]
    };
    let chopped = &real[..real.len() - 1];
    let longer = format!("{real}x");
    let upper = real.to_uppercase();
    let authorizations: Vec<(&str, Option<String>)> = vec![
        ("no Authorization", None),
        ("Basic credentials", Some("Basic dXNlcjpwYXNzd29yZA==".to_string())),
        ("Bearer without a token", Some("Bearer".to_string())),
        ("Bearer and a space", Some("Bearer ".to_string())),
        ("the token without a scheme", Some(real.to_string())),
        ("an unknown token", Some(format!("Bearer {}", secret_token("unknown")))),
        ("the token minus its last byte", Some(format!("Bearer {chopped}"))),
        ("the token plus a byte", Some(format!("Bearer {longer}"))),
        ("the token upper-cased", Some(format!("Bearer {upper}"))),
        ("two tokens", Some(format!("Bearer {real} {real}"))),
        ("a token of 8 KiB", Some(format!("Bearer {}", "a".repeat(8 * 1024)))),
    ];
    for (what, auth) in &authorizations {
        for req in requests() {
            let label = format!("{} {} with {what}", req.method, req.path);
            let req = match auth {
                Some(a) => req.header("Authorization", a),
                None => req,
            };
            assert_401(&s.send(&req), &label);
        }
        match ws_upgrade(&s, "", auth.as_deref().and_then(|a| a.strip_prefix("Bearer "))) {
            Err(status) => assert_eq!(status, 401, "GET /ws with {what}"),
            Ok(_) => panic!("GET /ws with {what}: upgraded"),
        }
    }
    // A token in the query string is for GET /ws only.
    let resp = s.send(&Req::post(&format!("/events?access_token={real}")).json(&ev(&id, "d")));
    assert_401(&resp, "POST /events?access_token=");
    assert_401(&s.get(&format!("/stats?access_token={real}")), "GET /stats?access_token=");
    assert_eq!(s.count_id(&id), 0, "an unauthenticated event was stored");
    // And the real one works.
    assert_ingest(&post_event_as(&s, real, &ev(&id, "d")), 200, 1, &[]);
    assert_eq!(s.count_id(&id), 1);
    assert_eq!(s.send_as(real, Req::get("/stats")).status, 200);
}

#[test]
fn two_authorization_headers_are_refused() {
    // Authorization is a singleton field (RFC 9110 §11.6.2): two of them are
    // malformed, whichever one is good — never "the last one wins".
    let admin = Tok::new("admin", &["admin"]);
    let s = with_tokens(&[&admin]).start();
    let unknown = "Bearer nope-nope-nope-nope";
    for req in [
        Req::get("/stats").header("Authorization", unknown).bearer(&admin.token),
        Req::get("/stats").bearer(&admin.token).header("Authorization", unknown),
    ] {
        let resp = s.send(&req);
        assert!(matches!(resp.status, 400 | 401), "two Authorization headers, one unknown:\n{resp:?}");
        assert_error(&resp, resp.status);
    }
}

#[test]
fn scopes_are_enforced_per_route() {
    let ingest = Tok::new("ingest", &["ingest"]);
    let subscribe = Tok::new("subscribe", &["subscribe"]);
    let admin = Tok::new("admin", &["admin"]);
    let s = with_tokens(&[&ingest, &subscribe, &admin]).start();

    // ingest: POST only.
    let id = unique("scoped");
    assert_ingest(&post_event_as(&s, &ingest.token, &ev(&id, "d")), 200, 1, &[]);
    let id2 = unique("scoped");
    assert_ingest(&post_batch_as(&s, &ingest.token, &[ev(&id2, "d")]), 200, 1, &[]);
    assert_403(&s.send_as(&ingest.token, Req::get("/stats")), "admin", "ingest token on /stats");
    assert_403(&s.send_as(&ingest.token, Req::get("/metrics")), "admin", "ingest token on /metrics");
    assert_eq!(ws_upgrade(&s, "", Some(&ingest.token)).err(), Some(403), "ingest token subscribing");

    // subscribe: GET /ws only.
    let nope = unique("nope");
    assert_403(&post_event_as(&s, &subscribe.token, &ev(&nope, "d")), "ingest", "subscribe token posting");
    assert_403(&post_batch_as(&s, &subscribe.token, &[ev(&nope, "d")]), "ingest", "subscribe token batch");
    assert_403(&s.send_as(&subscribe.token, Req::get("/stats")), "admin", "subscribe token on /stats");
    assert_eq!(
        ws_upgrade(&s, "?subscribe=false", Some(&subscribe.token)).err(),
        Some(403),
        "an ingest-only socket needs ingest"
    );
    drop(ws_ok(&s, "", Some(&subscribe.token)));

    // admin: /stats and /metrics only.
    assert_eq!(s.send_as(&admin.token, Req::get("/stats")).status, 200);
    let m = s.send_as(&admin.token, Req::get("/metrics"));
    assert_eq!(m.status, 200, "{m:?}");
    assert_403(&post_event_as(&s, &admin.token, &ev(&nope, "d")), "ingest", "admin token posting");
    assert_eq!(ws_upgrade(&s, "", Some(&admin.token)).err(), Some(403), "admin token subscribing");
    assert_eq!(s.count_id(&nope), 0, "a refused event was stored");
    assert_eq!(s.count(), 2);
}

#[test]
fn websocket_tokens_scopes_and_refused_ingest_frames() {
    let ingest = Tok::new("ingest", &["ingest"]);
    let subscribe = Tok::new("subscribe", &["subscribe"]);
    let s = with_tokens(&[&ingest, &subscribe]).start();

    assert_eq!(ws_upgrade(&s, "", None).err(), Some(401), "no token");
    assert_eq!(ws_upgrade(&s, "?access_token=nope-nope-nope-nope", None).err(), Some(401), "unknown access_token");
    // The query parameter works, with filters beside it.
    let device = unique("wsdev");
    let mut sub = ws_ok(&s, &format!("?device_id={device}&access_token={}", subscribe.token), None);
    // So does the header.
    let mut by_header = ws_ok(&s, &format!("?device_id={device}"), Some(&subscribe.token));

    // An ingest-only socket with an ingest token: frames are ingested.
    let mut ingest_ws = ws_ok(&s, &format!("?subscribe=false&access_token={}", ingest.token), None);
    let id = unique("wsin");
    ingest_ws.send(Message::Text(ev(&id, &device).to_string().into())).unwrap();
    let answer = next_json(&mut ingest_ws);
    assert_eq!((answer["seq"].as_u64(), answer["accepted"].as_u64()), (Some(1), Some(1)), "{answer}");
    assert_eq!(next_json(&mut sub)["event_id"], id.as_str());
    assert_eq!(next_json(&mut by_header)["event_id"], id.as_str());

    // A subscribe-only socket sending ingest frames: an error reply, nothing
    // stored, and the socket goes on (answers and pushes).
    let refused = unique("wsno");
    sub.send(Message::Text(ev(&refused, &device).to_string().into())).unwrap();
    let reply = next_json(&mut sub);
    assert_eq!(reply["seq"], 1, "{reply}");
    let error = reply["error"].as_str().unwrap_or_else(|| panic!("no error in the reply: {reply}"));
    assert!(error.contains("ingest"), "the reply does not name the scope: {reply}");
    assert!(reply.get("accepted").is_none_or(|a| a == 0), "{reply}");
    sub.send(Message::Text(json!([ev(&refused, &device)]).to_string().into())).unwrap();
    assert_eq!(next_json(&mut sub)["seq"], 2);
    let id2 = unique("wsin");
    assert_ingest(&post_event_as(&s, &ingest.token, &ev(&id2, &device)), 200, 1, &[]);
    assert_eq!(next_json(&mut sub)["event_id"], id2.as_str(), "the socket still gets pushes");
    assert_eq!(s.count_id(&refused), 0, "an ingest frame without the scope was stored");
}

#[test]
fn device_prefix_limits_ingest_and_subscriptions() {
    let fleet_a = Tok::new("fleet-a", &["ingest", "subscribe"]).prefix("fleet-a/");
    let all = Tok::new("all", &["ingest", "subscribe"]);
    let s = with_tokens(&[&fleet_a, &all]).start();
    let a = |n: &str| ev(&unique(n), &format!("fleet-a/{n}"));
    let b = |n: &str| ev(&unique(n), &format!("fleet-b/{n}"));

    // One event outside the prefix refuses the whole request.
    let mixed = vec![a("a1"), b("b1"), a("a2")];
    let resp = post_batch_as(&s, &fleet_a.token, &mixed);
    assert_eq!(resp.status, 403, "{resp:?}");
    assert_error(&resp, 403);
    for (what, e) in [
        ("another fleet", b("b2")),
        ("the prefix without its slash", ev(&unique("x"), "fleet-a")),
        ("the prefix in the middle", ev(&unique("x"), "x/fleet-a/1")),
        ("an upper-case prefix", ev(&unique("x"), "FLEET-A/1")),
    ] {
        assert_eq!(post_event_as(&s, &fleet_a.token, &e).status, 403, "{what}");
    }
    let ndjson = format!("{}\n{}\n", a("a3"), b("b3"));
    let resp = s.send(
        &Req::post("/events/batch")
            .header("Content-Type", "application/x-ndjson")
            .body(ndjson.into_bytes())
            .bearer(&fleet_a.token),
    );
    assert_eq!(resp.status, 403, "NDJSON with a foreign device:\n{resp:?}");
    assert_eq!(s.count(), 0, "nothing of a refused request is stored");
    // All inside: stored.
    let good = vec![a("a4"), a("a5")];
    assert_ingest(&post_batch_as(&s, &fleet_a.token, &good), 200, 2, &[]);
    assert_eq!(s.count_ids(&ids_of(&good)), 2);

    // Subscriptions: a filter outside the prefix is refused at upgrade.
    let q = |filter: &str| format!("?{filter}access_token={}", fleet_a.token);
    assert_eq!(ws_upgrade(&s, &q("device_id=fleet-b/1&"), None).err(), Some(403));
    assert_eq!(ws_upgrade(&s, &q("device_id=fleet-a&"), None).err(), Some(403));
    let mut one = ws_ok(&s, &q("device_id=fleet-a/one&"), None);
    // Without a filter: only the prefix's devices are pushed.
    let mut mine = ws_ok(&s, &q(""), None);
    let mixed = vec![b("p1"), a("p2"), b("p3"), ev(&unique("p4"), "fleet-a/one"), b("p5")];
    assert_ingest(&post_batch_as(&s, &all.token, &mixed), 200, 5, &[]);
    let got: Vec<Value> =
        drain_json(&mut mine, Duration::from_millis(600)).iter().map(|m| m["event_id"].clone()).collect();
    let want: Vec<Value> = mixed
        .iter()
        .filter(|e| e["device_id"].as_str().unwrap().starts_with("fleet-a/"))
        .map(|e| e["event_id"].clone())
        .collect();
    assert_eq!(got, want, "a prefixed subscriber without a filter");
    assert_eq!(next_json(&mut one)["event_id"], mixed[3]["event_id"]);

    // WS ingest frames outside the prefix: refused, nothing stored.
    let foreign = b("wsb");
    mine.send(Message::Text(foreign.to_string().into())).unwrap();
    let reply = next_json(&mut mine);
    assert!(reply.get("error").is_some() || reply["accepted"] == 0, "{reply}");
    assert_eq!(s.count_id(foreign["event_id"].as_str().unwrap()), 0);
}

#[test]
fn a_listener_beyond_loopback_needs_auth_mode_said_explicitly() {
    let check = |args: &[&str]| {
        let mut all = vec!["--check-config", "--database-url", "postgres://nobody@127.0.0.1:1/none"];
        all.extend_from_slice(args);
        run_cli(&all, &[], CLI_TIMEOUT)
    };
    for listen in [["--listen", "0.0.0.0:0"], ["--set", "tls.listen=0.0.0.0:0"]] {
        let out = check(&listen);
        assert_eq!(out.code(), Some(64), "{listen:?}: want exit 64: {out:?}");
        assert!(out.stderr.contains("auth.mode"), "{listen:?}: stderr does not name auth.mode:\n{}", out.stderr);
    }
    let out = check(&["--listen", "0.0.0.0:0", "--set", "auth.mode=off"]);
    assert_eq!(out.code(), Some(0), "explicitly off: {out:?}");
    let out = run_cli(
        &["--check-config", "--database-url", "postgres://nobody@127.0.0.1:1/none", "--listen", "0.0.0.0:0"],
        &[("INGESTD_AUTH__MODE", "off")],
        CLI_TIMEOUT,
    );
    assert_eq!(out.code(), Some(0), "explicitly off from the environment: {out:?}");
    // Loopback needs nothing, as the contract's default address shows.
    assert_eq!(check(&["--listen", "127.0.0.1:0"]).code(), Some(0));
}

#[test]
fn tokens_mode_needs_valid_tokens() {
    let check = |text: &str| {
        let path = temp_file("auth.toml", text);
        run_cli(
            &[
                "--check-config",
                "--database-url",
                "postgres://nobody@127.0.0.1:1/none",
                "--config",
                path.to_str().unwrap(),
            ],
            &[],
            CLI_TIMEOUT,
        )
    };
    let scoped = |token: &str, scopes: &str| {
        format!("[auth]\nmode = \"tokens\"\n\n[[auth.tokens]]\ntoken = \"{token}\"\nscopes = [{scopes}]\n")
    };
    for (what, text) in [
        ("tokens mode with no token", "[auth]\nmode = \"tokens\"\n".to_string()),
        ("a token under 16 bytes", scoped("short-token-15b", "\"ingest\"")),
        ("an unknown scope", scoped(&secret_token("x"), "\"root\"")),
        ("a missing token file", format!("[auth]\nmode = \"tokens\"\ntoken_file = \"/nonexistent/{}\"\n", unique("f"))),
        ("an unknown mode", "[auth]\nmode = \"maybe\"\n".to_string()),
    ] {
        let out = check(&text);
        assert_eq!(out.code(), Some(64), "{what}: want exit 64: {out:?}");
        assert!(out.stderr.contains("auth"), "{what}: stderr does not name `auth`:\n{}", out.stderr);
    }
    // And the same from the command line.
    let out = run_cli(
        &["--check-config", "--database-url", "postgres://nobody@127.0.0.1:1/none", "--set", "auth.mode=tokens"],
        &[],
        CLI_TIMEOUT,
    );
    assert_eq!(out.code(), Some(64), "{out:?}");
    assert!(out.stderr.contains("auth"), "{}", out.stderr);
    // A valid one passes, and --check-config does not print the token.
    let token = secret_token("ok");
    let out = check(&scoped(&token, "\"ingest\", \"admin\""));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(!out.stdout.contains(&token) && !out.stderr.contains(&token), "--check-config printed the token:\n{out:?}");
}

#[test]
fn tokens_never_appear_in_logs() {
    let good = Tok::new("logged", &["ingest", "subscribe"]);
    let narrow = Tok::new("narrow", &["admin"]);
    let unknown = secret_token("unknown");
    let s = with_tokens(&[&good, &narrow]).set("log.level", "debug").start();
    assert_ingest(&post_event_as(&s, &good.token, &ev(&unique("log"), "d")), 200, 1, &[]);
    assert_eq!(post_event_as(&s, &unknown, &ev(&unique("log"), "d")).status, 401);
    assert_eq!(post_event_as(&s, &narrow.token, &ev(&unique("log"), "d")).status, 403);
    assert_eq!(s.send(&Req::get("/stats").header("Authorization", &unknown)).status, 401);
    drop(ws_ok(&s, &format!("?access_token={}", good.token), None));
    assert_eq!(ws_upgrade(&s, &format!("?access_token={unknown}"), None).err(), Some(401));
    let mut ws = ws_ok(&s, "?subscribe=false", Some(&good.token));
    ws.send(Message::Text(ev(&unique("log"), "d").to_string().into())).unwrap();
    assert_eq!(next_json(&mut ws)["accepted"], 1);
    drop(ws);
    // A reload logs the token table it loaded: look once it has.
    let reloaded = s.sighup();
    assert!(reloaded.contains("SIGHUP: configuration reloaded"), "{reloaded}");
    assert!(s.stderr().contains("SIGHUP: tokens loaded"), "{}", s.stderr());
    let logs = format!("{}\n{}", s.stderr(), s.stdout());
    for secret in [&good.token, &narrow.token, &unknown] {
        // The whole token, and its random part alone.
        let random = &secret[secret.len() - 24..];
        assert!(!logs.contains(random), "a token ({secret}) appears in the logs:\n{logs}");
    }
}

#[test]
fn sighup_rereads_the_token_file() {
    let a = Tok::new("file-a", &["ingest"]);
    let b = Tok::new("file-b", &["ingest"]);
    let tokens = temp_file("tokens.toml", &a.toml("tokens"));
    let config = temp_file("auth.toml", &format!("[auth]\nmode = \"tokens\"\ntoken_file = \"{}\"\n", tokens.display()));
    let s = Ingestd::new().config_file(&config.display().to_string()).start();
    let works = |t: &Tok| post_event_as(&s, &t.token, &ev(&unique("hup"), "d")).status;
    assert_eq!(works(&a), 200);
    assert_eq!(works(&b), 401);

    // B replaces A. Server::sighup returns once the reload is logged as
    // done, with the new tokens (or the old ones) in force.
    std::fs::write(&tokens, b.toml("tokens")).unwrap();
    let line = s.sighup();
    assert!(line.contains("SIGHUP: configuration reloaded"), "{line}");
    assert_eq!(works(&b), 200, "token B after SIGHUP");
    assert_401(&post_event_as(&s, &a.token, &ev(&unique("hup"), "d")), "a token removed from the file");

    // Bad files keep the tokens in force: each reload is refused (each of
    // these files is one problem, so one refusal line), and only then are
    // the running tokens checked.
    for bad in [
        "[[tokens]]\ntoken = \"too-short\"\nscopes = [\"ingest\"]\n".to_string(),
        "this is not TOML [[[".to_string(),
        format!("[[tokens]]\ntoken = \"{}\"\nscopes = [\"everything\"]\n", a.token),
        String::new(),
    ] {
        std::fs::write(&tokens, &bad).unwrap();
        let line = s.sighup();
        assert!(line.contains("refused"), "a bad token file ({bad:?}) was not refused: {line}");
        assert_eq!(works(&b), 200, "a bad token file ({bad:?}) dropped the running tokens");
        assert_eq!(works(&a), 401, "a bad token file ({bad:?}) let a token in");
    }
    // Removing the file is a bad reload too.
    std::fs::remove_file(&tokens).unwrap();
    let line = s.sighup();
    assert!(line.contains("refused"), "a missing token file was not refused: {line}");
    assert_eq!(works(&b), 200, "a missing token file dropped the running tokens");
    assert_eq!(works(&a), 401, "a missing token file let a token in");
    // Both, from a good file again.
    std::fs::write(&tokens, format!("{}{}", a.toml("tokens"), b.toml("tokens"))).unwrap();
    let line = s.sighup();
    assert!(line.contains("SIGHUP: configuration reloaded"), "{line}");
    assert_eq!(works(&a), 200, "token A back");
    assert_eq!(works(&b), 200);
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

#[test]
fn tls_and_plain_listeners_serve_side_by_side() {
    let cert = TestCert::new();
    let s = cert.apply(Ingestd::new()).start();
    let out = s.stdout();
    let https = out.find(TLS_READY_PREFIX).unwrap_or_else(|| panic!("no https readiness line:\n{out}"));
    let http = out.find(READY_PREFIX).expect("plain readiness line");
    assert!(https < http, "the https line must come before the plain one:\n{out}");
    let tls = s.tls_addr();
    assert_ne!(tls, s.addr);

    // Keep-alive over TLS: several requests on one connection.
    let mut c = TlsConn::connect(tls, &cert);
    let (id1, id2) = (unique("tls"), unique("tls"));
    assert_ingest(&c.roundtrip(&Req::post("/events").json(&ev(&id1, "d"))), 200, 1, &[]);
    assert_ingest(&c.roundtrip(&Req::post("/events/batch").json(&json!([ev(&id2, "d")]))), 200, 1, &[]);
    let h = c.roundtrip(&Req::get("/health"));
    assert_eq!(h.status, 200, "{h:?}");
    assert_error(&c.roundtrip(&Req::get("/nope")), 404);
    // Plain HTTP at the same time.
    let mut plain = s.conn();
    let id3 = unique("plain");
    assert_ingest(&plain.roundtrip(&Req::post("/events").json(&ev(&id3, "d"))), 200, 1, &[]);
    let id4 = unique("tls");
    assert_ingest(&c.roundtrip(&Req::post("/events").json(&ev(&id4, "d"))), 200, 1, &[]);
    assert_eq!(s.count_ids(&[id1, id2, id3, id4]), 4);
    // A large body over TLS arrives whole.
    let big: Vec<Value> = (0..2000).map(|i| ev(&format!("{}-{i}", unique("tlsbig")), "d")).collect();
    assert_ingest(&c.roundtrip(&Req::post("/events/batch").json(&Value::Array(big.clone()))), 200, 2000, &[]);
    assert_eq!(s.count_ids(&ids_of(&big)), 2000);
}

#[test]
fn websocket_over_tls_gets_events_posted_over_plain_http() {
    let cert = TestCert::new();
    let s = cert.apply(Ingestd::new()).start();
    let device = unique("tlsws");
    let stream = tls_connect(s.tls_addr(), &cert);
    let url = format!("wss://127.0.0.1:{}/ws?device_id={device}", s.tls_addr().port());
    let (mut ws, resp) =
        tungstenite::client(url.as_str(), stream).unwrap_or_else(|e| panic!("WebSocket over TLS: {e}"));
    assert_eq!(resp.status().as_u16(), 101);
    let id = unique("tlsws");
    assert_ingest(&s.post_event(&ev(&id, &device)), 200, 1, &[]);
    let got = next_json(&mut ws);
    assert_eq!(got["event_id"], id.as_str(), "{got}");
    // Ingest over the same TLS socket.
    let id2 = unique("tlsws");
    ws.send(Message::Text(ev(&id2, &device).to_string().into())).unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(next_json(&mut ws));
    }
    assert!(seen.iter().any(|m| m["seq"] == 1 && m["accepted"] == 1), "{seen:?}");
    assert!(seen.iter().any(|m| m["event_id"] == id2.as_str()), "{seen:?}");
    assert_eq!(s.count_id(&id2), 1);
    ws.close(None).unwrap();
}

#[test]
fn plain_http_and_garbage_on_the_tls_port_are_closed_cleanly() {
    let cert = TestCert::new();
    let s = cert.apply(Ingestd::new().set("server.request_timeout_ms", 2000)).start();
    let tls = s.tls_addr();
    let closes = |bytes: &[u8], what: &str| {
        let mut c = TcpStream::connect(tls).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.write_all(bytes);
        let t0 = Instant::now();
        let mut got = Vec::new();
        let mut b = [0u8; 4096];
        loop {
            match c.read(&mut b) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => panic!("{what}: TLS port did not close the connection ({e}) after {:?}", t0.elapsed()),
            }
        }
        // Whatever came back (a TLS alert, at most) is no HTTP answer in clear.
        assert!(!got.starts_with(b"HTTP/1.1 200"), "{what}: the TLS port answered in plain text");
    };
    closes(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", "plain GET");
    closes(&Req::post("/events").json(&ev(&unique("clear"), "d")).to_bytes(), "plain POST");
    closes(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", "a truncated ClientHello");
    closes(&[0x16, 0x03, 0x03, 0xff, 0xff], "a record header claiming 64 KiB");
    closes(&[0u8; 3000], "zeros");
    // A client that connects and says nothing does not hold up others.
    let silent: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(tls).unwrap()).collect();
    let t0 = Instant::now();
    let mut c = TlsConn::connect(tls, &cert);
    assert_eq!(c.roundtrip(&Req::get("/health")).status, 200);
    assert!(t0.elapsed() < Duration::from_secs(1), "a TLS request took {:?} next to silent clients", t0.elapsed());
    drop(silent);
    // Both listeners still work.
    let id = unique("after");
    assert_ingest(&c.roundtrip(&Req::post("/events").json(&ev(&id, "d"))), 200, 1, &[]);
    assert_eq!(s.get("/health").status, 200);
    assert_eq!(s.count_id(&id), 1);
}

/// A TLS handshake with `config`; the server's leaf certificate, or why not.
fn handshake(addr: std::net::SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<Vec<u8>, String> {
    let mut tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    Ok(conn.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref().to_vec()).unwrap_or_default())
}

#[test]
fn sighup_rereads_the_certificate_and_keeps_open_connections() {
    let old = TestCert::new();
    let s = old.apply(Ingestd::new()).start();
    let tls = s.tls_addr();
    assert_eq!(handshake(tls, old.client_config()).unwrap(), old.der.as_ref());
    let mut open = TlsConn::connect(tls, &old);
    assert_eq!(open.roundtrip(&Req::get("/health")).status, 200);

    // Renewal: a new pair written over the same files, then SIGHUP.
    let new = TestCert::new();
    std::fs::copy(&new.cert_file, &old.cert_file).unwrap();
    std::fs::copy(&new.key_file, &old.key_file).unwrap();
    let mark = s.log_mark();
    let line = s.sighup();
    assert!(line.contains("SIGHUP: configuration reloaded"), "{line}");
    let loaded = s.wait_for_log_since(mark, &["SIGHUP: TLS certificate loaded"], Duration::from_secs(5));
    let fingerprint: String = {
        use sha2::Digest as _;
        sha2::Sha256::digest(new.der.as_ref()).iter().map(|b| format!("{b:02x}")).collect()
    };
    assert!(loaded.contains(&format!("sha256={fingerprint}")), "{loaded}");
    // New handshakes see the new certificate; a client trusting only the old one fails.
    assert_eq!(handshake(tls, new.client_config()).unwrap(), new.der.as_ref());
    assert!(handshake(tls, old.client_config()).is_err());
    // The connection opened before keeps its session and still works.
    let id = unique("tlsreload");
    assert_ingest(&open.roundtrip(&Req::post("/events").json(&ev(&id, "d"))), 200, 1, &[]);
    assert_eq!(s.count_id(&id), 1);

    // A bad pair keeps the running one, and the log says which file and why.
    std::fs::write(&old.cert_file, "not a certificate").unwrap();
    let line = s.sighup();
    assert!(line.contains("SIGHUP: reload refused") && line.contains("tls.cert_file"), "{line}");
    let mismatched = TestCert::new();
    std::fs::copy(&mismatched.cert_file, &old.cert_file).unwrap();
    let line = s.sighup();
    assert!(line.contains("SIGHUP: reload refused") && line.contains("not a valid certificate for the key"), "{line}");
    assert_eq!(handshake(tls, new.client_config()).unwrap(), new.der.as_ref());
    let mut after = TlsConn::connect(tls, &new);
    assert_eq!(after.roundtrip(&Req::get("/health")).status, 200);
}

#[test]
fn a_bad_certificate_is_a_startup_error() {
    let cert = TestCert::new();
    let garbage =
        temp_file("garbage.pem", "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n");
    let empty = temp_file("empty.pem", "");
    let key_as_cert = cert.key_file.display().to_string();
    let url = database_url();
    let mut problems = Vec::new();
    for (what, cert_file, key_file, names) in [
        (
            "a missing cert file",
            format!("/nonexistent/{}.pem", unique("c")),
            cert.key_file.display().to_string(),
            "tls.cert_file",
        ),
        ("a garbage cert file", garbage.display().to_string(), cert.key_file.display().to_string(), "tls.cert_file"),
        ("an empty cert file", empty.display().to_string(), cert.key_file.display().to_string(), "tls.cert_file"),
        ("a key where the cert goes", key_as_cert, cert.key_file.display().to_string(), "tls.cert_file"),
        (
            "a missing key file",
            cert.cert_file.display().to_string(),
            format!("/nonexistent/{}.pem", unique("k")),
            "tls.key_file",
        ),
        (
            "a cert where the key goes",
            cert.cert_file.display().to_string(),
            cert.cert_file.display().to_string(),
            "tls.key_file",
        ),
    ] {
        let sets = [
            "--set".to_string(),
            "tls.listen=127.0.0.1:0".to_string(),
            "--set".to_string(),
            format!("tls.cert_file={cert_file}"),
            "--set".to_string(),
            format!("tls.key_file={key_file}"),
            "--set".to_string(),
            "server.pin_cores=false".to_string(),
        ];
        let mut args: Vec<&str> = vec!["--listen", "127.0.0.1:0", "--database-url", &url];
        args.extend(sets.iter().map(String::as_str));
        let out = run_cli(&args, &[], CLI_TIMEOUT);
        assert!(!out.stdout.contains(READY_PREFIX), "{what}: printed ready: {}", out.stdout);
        if out.code() != Some(64) || !out.stderr.contains(names) {
            problems.push(format!("{what}: want exit 64 naming {names}, got {:?}: {}", out.code(), out.stderr.trim()));
        }
        let mut check = vec!["--check-config"];
        check.extend(args);
        let out = run_cli(&check, &[], CLI_TIMEOUT);
        if out.code() != Some(64) {
            problems.push(format!("{what}: --check-config exits {:?}", out.code()));
        }
    }
    assert!(problems.is_empty(), "bad certificates:\n{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// Abuse limits
// ---------------------------------------------------------------------------

#[test]
fn per_ip_request_rate_is_limited_with_429() {
    let s = Ingestd::new()
        .set("limits.ip_requests_per_s", 5)
        .set("limits.ip_burst", 5)
        .set("ingest.ack", "queue") // quick 202s: the burst is what is measured
        .start();
    let post = |tag: &str| s.send(&Req::post("/events").json(&ev(&unique(tag), "d")));
    let statuses: Vec<Response> = (0..10).map(|_| post("rate")).collect();
    let codes: Vec<u16> = statuses.iter().map(|r| r.status).collect();
    assert!(codes[..5].iter().all(|&c| c == 202), "the burst of 5 is served: {codes:?}");
    // At most one token refilled while the burst was sent.
    assert!(codes[6..].iter().all(|&c| c == 429), "over the rate: 429: {codes:?}");
    let mut wait = 1;
    for r in statuses.iter().filter(|r| r.status == 429) {
        wait = wait.max(assert_429(r, "over ip_requests_per_s"));
    }
    // Other routes count too, and get the same answer.
    assert_eq!(s.get("/stats").status, 429);
    // After Retry-After it works again. This sleep stays: a client obeying
    // Retry-After waits that long, and the refill of the rate limiter over
    // that time is what is tested; no state of the server says "refilled"
    // (and polling before then would spend the tokens it refills).
    thread::sleep(Duration::from_secs(wait));
    eventually(Duration::from_secs(3), "requests served again after Retry-After", || {
        (post("again").status == 202).then_some(())
    });
}

#[test]
fn per_token_request_rate_is_per_token() {
    let a = Tok::new("rate-a", &["ingest", "admin"]);
    let b = Tok::new("rate-b", &["ingest", "admin"]);
    let s = with_tokens(&[&a, &b])
        .set("limits.token_requests_per_s", 3)
        .set("limits.token_burst", 3)
        .set("ingest.ack", "queue")
        .start();
    let post = |t: &Tok| post_event_as(&s, &t.token, &ev(&unique("trate"), "d"));
    let a_codes: Vec<Response> = (0..7).map(|_| post(&a)).collect();
    let codes: Vec<u16> = a_codes.iter().map(|r| r.status).collect();
    assert!(codes[..3].iter().all(|&c| c == 202), "token A's burst: {codes:?}");
    assert!(codes[4..].iter().all(|&c| c == 429), "token A over its rate: {codes:?}");
    for r in a_codes.iter().filter(|r| r.status == 429) {
        assert_429(r, "over token_requests_per_s");
    }
    // Token B, from the same IP, right now: unaffected.
    let b_codes: Vec<u16> = (0..3).map(|_| post(&b).status).collect();
    assert_eq!(b_codes, [202, 202, 202], "token B is limited by token A's use");
    // A bad token is not a way around it either: still 401.
    assert_eq!(post_event_as(&s, &secret_token("x"), &ev(&unique("x"), "d")).status, 401);
    eventually(Duration::from_secs(5), "token A served again", || (post(&a).status == 202).then_some(()));
}

#[test]
fn connections_per_ip_are_limited() {
    let s = Ingestd::new().set("limits.max_connections_per_ip", 3).start();
    let mut open: Vec<Conn> = (0..3).map(|_| s.conn()).collect();
    for c in open.iter_mut() {
        assert_eq!(c.roundtrip(&Req::get("/health")).status, 200);
    }
    // The fourth: a 429 with Retry-After, then closed.
    let mut fourth = s.conn();
    let _ = fourth.try_write(&Req::get("/health").to_bytes());
    let resp = fourth.try_read_response().unwrap_or_else(|e| panic!("no 429 for the 4th connection: {e}"));
    assert_429(&resp, "the 4th connection from one IP");
    assert!(fourth.closed_by_peer(Duration::from_secs(5)), "the 4th connection was not closed after its 429");
    // The three are unaffected.
    for c in open.iter_mut() {
        assert_eq!(c.roundtrip(&Req::get("/health")).status, 200);
    }
    // Closing one makes room.
    drop(open.pop());
    eventually(Duration::from_secs(5), "a new connection once one closed", || {
        let mut c = Conn::try_open(s.addr).ok()?;
        let resp = c.try_roundtrip(&Req::get("/health")).ok()?;
        (resp.status == 200).then_some(())
    });
}

#[test]
fn a_client_that_never_reads_is_cut_off_by_write_timeout() {
    let s = Ingestd::new().set("server.write_timeout_ms", 1000).start();
    // A socket with a small receive buffer that never reads, sending
    // pipelined GET /metrics (large answers) as fast as it can.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&s.addr.into()).unwrap();
    let mut stuck: TcpStream = socket.into();
    stuck.set_write_timeout(Some(Duration::from_millis(100))).unwrap();
    let pipelined = Req::get("/metrics").to_bytes().repeat(20_000);
    let t0 = Instant::now();
    let mut written = 0;
    let mut last_progress = Instant::now();
    let mut fast = Vec::new();
    let ended = loop {
        if t0.elapsed() > Duration::from_secs(20) {
            break None;
        }
        match stuck.write(&pipelined[written % pipelined.len()..]) {
            Ok(n) => {
                written += n;
                last_progress = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => break Some((e.kind(), last_progress)),
        }
        // Another client is served normally meanwhile.
        let t = Instant::now();
        assert_eq!(s.get("/health").status, 200);
        fast.push(t.elapsed());
    };
    let (kind, stalled_at) = ended.unwrap_or_else(|| panic!("not disconnected after 20 s ({written} bytes written)"));
    let worst = fast.iter().max().copied().unwrap_or_default();
    println!(
        "write timeout: {written} bytes of requests written; writes stalled {:?} after the start, the connection \
         ended ({kind:?}) {:?} later; worst GET /health meanwhile {worst:?}",
        stalled_at - t0,
        stalled_at.elapsed()
    );
    assert!(
        stalled_at.elapsed() < Duration::from_millis(1000 + 4000),
        "cut off {:?} after the server stopped reading (write_timeout_ms = 1000)",
        stalled_at.elapsed()
    );
    assert!(worst < Duration::from_millis(500), "GET /health took {worst:?} next to the stuck client");
    // The server is fine.
    let id = unique("after");
    assert_ingest(&s.post_event(&ev(&id, "d")), 200, 1, &[]);
    eventually(Duration::from_secs(5), "the stuck connection released", || {
        let stats = s.get("/stats").json();
        (stats["connections_open"].as_i64() == Some(1)).then_some(())
    });
}
