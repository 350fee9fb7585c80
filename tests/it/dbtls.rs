//! TLS to PostgreSQL (issue 12): a cluster of the test's own that accepts
//! TCP only over TLS (`hostssl`, scram-sha-256), with a CA and a server
//! certificate for `localhost` made here (rcgen). `sslmode=require` and
//! `verify-full` store events; `verify-ca` by IP address with the CA as the
//! "system" roots (`SSL_CERT_FILE`) stores events; a wrong CA, a wrong host
//! name and `sslmode=disable` fail at start-up with exit 69 and a message
//! naming the cause and the key; a rotated `password_file` is used after
//! SIGHUP; passwords never show in `--check-config`.
//!
//! One test for the whole cluster: making it is most of the cost.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;

struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    other_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn ca(name: &str) -> (rcgen::CertificateParams, rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

fn pki() -> Pki {
    let dir = std::env::temp_dir().join(unique("ingestd-dbtls"));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca_params, ca_key, ca_pem) = ca("ingestd test CA");
    let (_, _, other_pem) = ca("some other CA");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    // Valid for localhost only: connecting to 127.0.0.1 fails verify-full.
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    Pki {
        ca: write("ca.pem", &ca_pem),
        other_ca: write("other-ca.pem", &other_pem),
        cert: write("server.crt", &cert.pem()),
        key: write("server.key", &key.serialize_pem()),
        dir,
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn count(admin: &mut postgres::Client, table: &str, id: &str) -> i64 {
    admin.query_one(&format!("SELECT count(*) FROM {table} WHERE event_id = $1"), &[&id]).unwrap().get(0)
}

/// Runs ingestd to its exit; returns (code, stderr).
fn start_fails(url: &str, password_file: &Path) -> (Option<i32>, String) {
    let table = format!("database.table={}", unique("t"));
    let pw = format!("database.password_file={}", password_file.display());
    let out = run_cli(
        &["--listen", "127.0.0.1:0", "--database-url", url, "--set", &table, "--set", &pw],
        &[],
        Duration::from_secs(30),
    );
    (out.code(), out.stderr)
}

#[test]
fn tls_only_postgres() {
    let pki = pki();
    let pg = PrivatePg::start();
    pg.tls_only(&pki.cert, &pki.key);
    let mut admin = pg.admin();
    eventually(Duration::from_secs(10), "ssl = on after the reload", || {
        (admin.query_one("SHOW ssl", &[]).unwrap().get::<_, String>(0) == "on").then_some(())
    });
    admin
        .batch_execute(
            "SET password_encryption = 'scram-sha-256'; CREATE ROLE app LOGIN PASSWORD 'first-secret'; \
             GRANT ALL ON SCHEMA public TO app",
        )
        .unwrap();
    let password_file = pki.dir.join("password");
    std::fs::write(&password_file, "first-secret\n").unwrap();
    let port = pg.port();
    let ca = pki.ca.display();

    // sslmode=require, the password from database.password_file.
    let table = unique("t");
    let server = Ingestd::new()
        .database_url(&format!("postgres://app@127.0.0.1:{port}/postgres?sslmode=require"))
        .set("database.password_file", password_file.display())
        .table(&table)
        .start();
    assert_ingest(&server.post_event(&event("tls-require-1")), 200, 1, &[]);
    assert_eq!(count(&mut admin, &table, "tls-require-1"), 1);
    let ssl_backends: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = 'app' AND s.ssl",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(ssl_backends >= 1, "ingestd's connections are TLS");
    assert!(!server.stderr().contains("first-secret"), "the password is never logged");

    // The password rotated: the file changes, SIGHUP, the old sessions cut;
    // new connections log in with the new password.
    admin.batch_execute("ALTER ROLE app PASSWORD 'second-secret'").unwrap();
    std::fs::write(&password_file, "second-secret\n").unwrap();
    let reloaded = server.sighup();
    assert!(reloaded.contains("configuration reloaded"), "{reloaded}");
    admin.batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'").unwrap();
    let mut n = 0;
    eventually(Duration::from_secs(20), "an event stored after the password rotation", || {
        n += 1;
        let id = format!("tls-rotated-{n}");
        (server.post_event(&event(&id)).status == 200 && count(&mut admin, &table, &id) == 1).then_some(())
    });
    assert!(!server.stderr().contains("second-secret"));
    drop(server);

    // verify-full by the name on the certificate, the password from PGPASSWORD.
    let table = unique("t");
    let server = Ingestd::new()
        .database_url(&format!("postgres://app@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={ca}"))
        .env("PGPASSWORD", "second-secret")
        .table(&table)
        .start();
    assert_ingest(&server.post_event(&event("tls-full-1")), 200, 1, &[]);
    assert_eq!(count(&mut admin, &table, "tls-full-1"), 1);
    drop(server);

    // verify-ca by IP address (the host name is not checked), the CA as
    // the system's roots (no ca_file), the mode as a config key.
    let table = unique("t");
    let server = Ingestd::new()
        .database_url(&format!("postgres://app@127.0.0.1:{port}/postgres"))
        .set("database.tls_mode", "verify-ca")
        .set("database.password_file", password_file.display())
        .env("SSL_CERT_FILE", &ca.to_string())
        .table(&table)
        .start();
    assert_ingest(&server.post_event(&event("tls-ca-1")), 200, 1, &[]);
    assert_eq!(count(&mut admin, &table, "tls-ca-1"), 1);
    drop(server);

    // A CA that did not sign the server's certificate.
    let url =
        format!("postgres://app@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={}", pki.other_ca.display());
    let (code, stderr) = start_fails(&url, &password_file);
    assert_eq!(code, Some(69), "{stderr}");
    assert!(stderr.contains("does not verify against") && stderr.contains("database.ca_file"), "{stderr}");

    // The right CA, but a host name the certificate does not carry.
    let url = format!("postgres://app@127.0.0.1:{port}/postgres?sslmode=verify-full&sslrootcert={ca}");
    let (code, stderr) = start_fails(&url, &password_file);
    assert_eq!(code, Some(69), "{stderr}");
    assert!(stderr.contains("not valid for the host name"), "{stderr}");

    // TLS off against a server that requires it.
    let url = format!("postgres://app@127.0.0.1:{port}/postgres?sslmode=disable");
    let (code, stderr) = start_fails(&url, &password_file);
    assert_eq!(code, Some(69), "{stderr}");
    assert!(stderr.contains("requires TLS") && stderr.contains("database.tls_mode"), "{stderr}");
    assert!(!stderr.contains("unreachable"), "{stderr}");

    // A URL parameter and a key that disagree: a configuration error (64).
    let out = run_cli(
        &[
            "--check-config",
            "--database-url",
            "postgres://app@h/db?sslmode=verify-full",
            "--set",
            "database.tls_mode=disable",
        ],
        &[],
        Duration::from_secs(10),
    );
    assert_eq!(out.code(), Some(64), "{}", out.stderr);
    assert!(out.stderr.contains("database.tls_mode") && out.stderr.contains("sslmode=verify-full"), "{}", out.stderr);
}

#[test]
fn check_config_masks_passwords_in_every_url_form() {
    for (url, secret) in [
        ("postgres://app:url-secret@db.example.com/app?sslmode=verify-full", "url-secret"),
        ("postgresql://app@db.example.com/app?password=query-secret", "query-secret"),
        ("host=db.example.com user=app password='kv secret' sslmode=require", "kv secret"),
    ] {
        let out = run_cli(&["--check-config", "--database-url", url], &[], Duration::from_secs(10));
        assert_eq!(out.code(), Some(0), "{url}: {}", out.stderr);
        assert!(!out.stdout.contains(secret) && !out.stderr.contains(secret), "{url}:\n{}", out.stdout);
        assert!(out.stdout.contains("***"), "{}", out.stdout);
    }
}
