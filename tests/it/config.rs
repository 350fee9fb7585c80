//! The command line and configuration (SPEC "Configuration", INTERFACE CLI
//! and exit codes): `--check-config` prints the effective config (TOML) and
//! exits 0 without a database; precedence flag > env > file > default;
//! unknown keys and invalid values exit 64 naming the key, from `--set`, env
//! or a config file, before any database connection; a database that
//! refuses ingestd at start-up (missing table with creation off) exits 69.
//! (An unreachable one does not: see `reliability`.)

use std::time::Duration;

use crate::support::*;

const CLI_TIMEOUT: Duration = Duration::from_secs(20);
/// Nothing listens on port 1: a run that got past the config would hang
/// around not ready instead of exiting 64.
const NOWHERE: &str = "postgres://nobody:s3cr3t-pw@127.0.0.1:1/none";

/// `ingestd --check-config --database-url NOWHERE ARGS...`.
fn check_config(args: &[&str], env: &[(&str, &str)]) -> CliOutput {
    let mut all = vec!["--check-config", "--database-url", NOWHERE];
    all.extend_from_slice(args);
    run_cli(&all, env, CLI_TIMEOUT)
}

fn effective(out: &CliOutput) -> toml::Table {
    assert_eq!(out.code(), Some(0), "--check-config failed: {out:?}");
    out.stdout
        .parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("--check-config output is not TOML ({e}):\n{}", out.stdout))
}

fn key<'a>(t: &'a toml::Table, path: &str) -> &'a toml::Value {
    let (section, k) = path.split_once('.').unwrap();
    t.get(section)
        .and_then(|s| s.get(k))
        .unwrap_or_else(|| panic!("effective config lacks {path}:\n{}", toml::to_string(t).unwrap()))
}

#[test]
fn check_config_prints_the_effective_config_and_exits_0() {
    let out =
        check_config(&["--set", "server.shards=3", "--set", "writer.writers=5", "--listen", "127.0.0.1:9999"], &[]);
    let t = effective(&out);
    assert_eq!(key(&t, "server.shards").as_integer(), Some(3));
    assert_eq!(key(&t, "writer.writers").as_integer(), Some(5));
    assert_eq!(key(&t, "server.listen").as_str(), Some("127.0.0.1:9999"));
    // Defaults from docs/INTERFACE.md are part of the effective config.
    assert_eq!(key(&t, "ingest.ack").as_str(), Some("commit"));
    assert_eq!(key(&t, "ingest.max_payload_bytes").as_integer(), Some(65536));
    assert_eq!(key(&t, "pipeline.ring_capacity").as_integer(), Some(1024));
    assert_eq!(key(&t, "database.table").as_str(), Some("events"));
    assert!(!out.stdout.contains("s3cr3t-pw"), "--check-config printed the database password:\n{}", out.stdout);
}

#[test]
fn flags_win_over_env_and_env_over_file() {
    let dir = std::env::temp_dir().join(unique("ingestd_cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    std::fs::write(&file, "[writer]\nwriters = 3\n\n[server]\nshards = 7\nretry_after_s = 9\n").unwrap();
    let file = file.to_str().unwrap();

    let t = effective(&check_config(&["--config", file], &[]));
    assert_eq!(key(&t, "writer.writers").as_integer(), Some(3), "file value");
    assert_eq!(key(&t, "server.shards").as_integer(), Some(7), "file value");

    let env = [("INGESTD_WRITER__WRITERS", "4"), ("INGESTD_LISTEN", "127.0.0.1:7777")];
    let t = effective(&check_config(&["--config", file], &env));
    assert_eq!(key(&t, "writer.writers").as_integer(), Some(4), "env beats file");
    assert_eq!(key(&t, "server.listen").as_str(), Some("127.0.0.1:7777"), "INGESTD_LISTEN");
    assert_eq!(key(&t, "server.retry_after_s").as_integer(), Some(9), "file value kept");

    let t =
        effective(&check_config(&["--config", file, "--set", "writer.writers=6", "--listen", "127.0.0.1:6666"], &env));
    assert_eq!(key(&t, "writer.writers").as_integer(), Some(6), "flag beats env");
    assert_eq!(key(&t, "server.listen").as_str(), Some("127.0.0.1:6666"), "--listen beats env");
    let _ = std::fs::remove_dir_all(&dir);
}

fn assert_usage_error(out: &CliOutput, must_name: &str) {
    assert_eq!(out.code(), Some(64), "want exit 64 for a bad config: {out:?}");
    assert!(out.stderr.contains(must_name), "stderr does not name {must_name:?}:\n{}", out.stderr);
}

#[test]
fn unknown_key_exits_64_naming_it() {
    let out = check_config(&["--set", "server.nope=1"], &[]);
    assert_usage_error(&out, "server.nope");
    let out = check_config(&["--set", "nosuchsection.key=1"], &[]);
    assert_usage_error(&out, "nosuchsection");
    let out = check_config(&[], &[("INGESTD_SERVER__NOPE", "1")]);
    assert_eq!(out.code(), Some(64), "unknown key from env: {out:?}");
    assert!(out.stderr.to_lowercase().contains("nope"), "stderr does not name the key:\n{}", out.stderr);
}

#[test]
fn bad_value_exits_64_naming_the_key() {
    let out = check_config(&["--set", "writer.writers=abc"], &[]);
    assert_usage_error(&out, "writer.writers");
    let out = check_config(&["--set", "ingest.ack=sometimes"], &[]);
    assert_usage_error(&out, "ingest.ack");
    let out = check_config(&["--listen", "not-an-address"], &[]);
    assert_eq!(out.code(), Some(64), "bad --listen: {out:?}");
    let out = check_config(&["--set", "no-equals-sign"], &[]);
    assert_eq!(out.code(), Some(64), "malformed --set: {out:?}");
    let out = run_cli(&["--no-such-flag"], &[], CLI_TIMEOUT);
    assert_eq!(out.code(), Some(64), "unknown flag: {out:?}");
}

#[test]
fn unknown_key_in_a_config_file_exits_64() {
    let dir = std::env::temp_dir().join(unique("ingestd_cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[server]\nshards = 1\nnope = 1\n").unwrap();
    let out = check_config(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.code(), Some(64), "{out:?}");
    assert!(out.stderr.contains("nope"), "stderr does not name the key:\n{}", out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_config_is_reported_before_touching_the_database() {
    // An unreachable database would start ingestd not ready: 64 shows config came first.
    let out = run_cli(
        &["--listen", "127.0.0.1:0", "--database-url", "postgres://nobody@127.0.0.1:1/none", "--set", "server.nope=1"],
        &[],
        CLI_TIMEOUT,
    );
    assert_usage_error(&out, "server.nope");
}

#[test]
fn database_refusing_the_table_exits_69() {
    let missing = unique("missing");
    let url = database_url();
    let out = run_cli(
        &[
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &url,
            "--set",
            &format!("database.table={missing}"),
            "--set",
            "database.create_table=false",
            "--set",
            "server.pin_cores=false",
        ],
        &[],
        CLI_TIMEOUT,
    );
    assert_eq!(out.code(), Some(69), "{out:?}");
    assert!(out.stderr.contains(&missing), "names the table: {}", out.stderr);
    assert!(!out.stdout.contains(READY_PREFIX), "printed ready without its table: {}", out.stdout);
}
