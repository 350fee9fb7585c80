//! TLS to PostgreSQL (issue 12): a cluster of the test's own that accepts
//! TCP only over TLS (`hostssl`, scram-sha-256), with a CA and a server
//! certificate for `localhost` made here (rcgen). `sslmode=require` and
//! `verify-full` store events; `verify-ca` by IP address with the CA as the
//! "system" roots (`SSL_CERT_FILE`) stores events; a wrong CA, a wrong host
//! name and `sslmode=disable` fail at start-up with exit 69 and a message
//! naming the cause and the key; a rotated `password_file` is used after
//! SIGHUP; passwords never show in `--check-config`.
//!
//! Client certificates: a second cluster where the user `certuser` may log
//! in only with a certificate (CN=certuser) signed by a client CA (pg_hba
//! `cert`, no password). `sslcert`/`sslkey` in the URL and the keys
//! `database.cert_file`/`key_file` store events over a certificate-
//! authenticated session; no certificate, one from another CA or for
//! another user fail at start-up with exit 69 naming the cause; a key file
//! that is missing, not a key or not the certificate's fails with exit 64
//! naming the key.
//!
//! One test per cluster: making it is most of the cost.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;

struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    other_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// The CA PostgreSQL trusts for client certificates (`ssl_ca_file`).
    client_ca: PathBuf,
    /// CN=certuser, signed by `client_ca`.
    client: ClientCert,
    /// CN=certuser, signed by "some other CA".
    stranger: ClientCert,
    /// CN=app, signed by `client_ca`: a valid certificate for another user.
    app: ClientCert,
}

/// A client certificate and its key, as files.
struct ClientCert {
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
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (ca_params, ca_key, ca_pem) = ca("ingestd test CA");
    let (other_params, other_key, other_pem) = ca("some other CA");
    let (client_ca_params, client_ca_key, client_ca_pem) = ca("ingestd test client CA");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    // Valid for localhost only: connecting to 127.0.0.1 fails verify-full.
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    // PostgreSQL's `cert` method takes the user name from the CN.
    let client = |name: &str, user: &str, params: &rcgen::CertificateParams, ca_key: &rcgen::KeyPair| {
        let issuer = rcgen::Issuer::from_params(params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, user);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &issuer).unwrap();
        ClientCert {
            cert: write(&format!("{name}.crt"), &cert.pem()),
            key: write(&format!("{name}.key"), &key.serialize_pem()),
        }
    };
    Pki {
        ca: write("ca.pem", &ca_pem),
        other_ca: write("other-ca.pem", &other_pem),
        cert: write("server.crt", &cert.pem()),
        key: write("server.key", &key.serialize_pem()),
        client_ca: write("client-ca.pem", &client_ca_pem),
        client: client("certuser", "certuser", &client_ca_params, &client_ca_key),
        stranger: client("stranger", "certuser", &other_params, &other_key),
        app: client("app", "app", &client_ca_params, &client_ca_key),
        dir,
    }
}

/// A cluster of the test's own that takes TCP only over TLS with `pki`'s
/// server certificate (and `client`: see [`PrivatePg::tls_only`]), once it
/// has reloaded; and a superuser connection over the Unix socket.
fn tls_cluster(pki: &Pki, client: Option<(&Path, &str)>) -> (PrivatePg, postgres::Client) {
    let pg = PrivatePg::start();
    pg.tls_only(&pki.cert, &pki.key, client);
    let mut admin = pg.admin();
    let ca_file = if client.is_some() { "client-ca.crt" } else { "" };
    eventually(Duration::from_secs(10), "ssl = on (and ssl_ca_file) after the reload", || {
        let row = admin.query_one("SELECT current_setting('ssl'), current_setting('ssl_ca_file')", &[]).unwrap();
        (row.get::<_, String>(0) == "on" && row.get::<_, String>(1) == ca_file).then_some(())
    });
    (pg, admin)
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn count(admin: &mut postgres::Client, table: &str, id: &str) -> i64 {
    admin.query_one(&format!("SELECT count(*) FROM {table} WHERE event_id = $1"), &[&id]).unwrap().get(0)
}

/// Runs ingestd with `sets` (`key=value`) to its exit; returns (code, stderr).
fn start_fails(url: &str, sets: &[String]) -> (Option<i32>, String) {
    let mut args = vec!["--listen".to_string(), "127.0.0.1:0".into(), "--database-url".into(), url.into()];
    for set in std::iter::once(format!("database.table={}", unique("t"))).chain(sets.iter().cloned()) {
        args.extend(["--set".to_string(), set]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_cli(&args, &[], Duration::from_secs(30));
    (out.code(), out.stderr)
}

#[test]
fn tls_only_postgres() {
    let pki = pki();
    let (pg, mut admin) = tls_cluster(&pki, None);
    admin
        .batch_execute(
            "SET password_encryption = 'scram-sha-256'; CREATE ROLE app LOGIN PASSWORD 'first-secret'; \
             GRANT ALL ON SCHEMA public TO app",
        )
        .unwrap();
    let password_file = pki.dir.join("password");
    std::fs::write(&password_file, "first-secret\n").unwrap();
    let pw = vec![format!("database.password_file={}", password_file.display())];
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
    let (code, stderr) = start_fails(&url, &pw);
    assert_eq!(code, Some(69), "{stderr}");
    assert!(stderr.contains("does not verify against") && stderr.contains("database.ca_file"), "{stderr}");

    // The right CA, but a host name the certificate does not carry.
    let url = format!("postgres://app@127.0.0.1:{port}/postgres?sslmode=verify-full&sslrootcert={ca}");
    let (code, stderr) = start_fails(&url, &pw);
    assert_eq!(code, Some(69), "{stderr}");
    assert!(stderr.contains("not valid for the host name"), "{stderr}");

    // TLS off against a server that requires it.
    let url = format!("postgres://app@127.0.0.1:{port}/postgres?sslmode=disable");
    let (code, stderr) = start_fails(&url, &pw);
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
fn client_certificates() {
    let pki = pki();
    let (pg, mut admin) = tls_cluster(&pki, Some((&pki.client_ca, "certuser")));
    // No password: the certificate is the only way in.
    admin.batch_execute("CREATE ROLE certuser LOGIN; GRANT ALL ON SCHEMA public TO certuser").unwrap();
    let port = pg.port();
    let ca = pki.ca.display();
    let (cert, key) = (pki.client.cert.display(), pki.client.key.display());
    // The sessions of certuser and the subject of their certificate.
    let cert_sessions = |admin: &mut postgres::Client| -> Vec<String> {
        admin
            .query(
                "SELECT coalesce(s.client_dn, '') FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.usename = 'certuser'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };

    // sslcert / sslkey in the URL, verify-full.
    let table = unique("t");
    let server = Ingestd::new()
        .database_url(&format!(
            "postgres://certuser@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={ca}&sslcert={cert}&sslkey={key}"
        ))
        .table(&table)
        .start();
    assert_ingest(&server.post_event(&event("cert-url-1")), 200, 1, &[]);
    assert_eq!(count(&mut admin, &table, "cert-url-1"), 1);
    let sessions = cert_sessions(&mut admin);
    assert!(!sessions.is_empty() && sessions.iter().all(|dn| dn == "/CN=certuser"), "{sessions:?}");
    drop(server);

    // The same as keys, sslmode=require (the server's certificate unchecked).
    let table = unique("t");
    let server = Ingestd::new()
        .database_url(&format!("postgres://certuser@127.0.0.1:{port}/postgres?sslmode=require"))
        .set("database.cert_file", &cert)
        .set("database.key_file", &key)
        .table(&table)
        .start();
    assert_ingest(&server.post_event(&event("cert-keys-1")), 200, 1, &[]);
    assert_eq!(count(&mut admin, &table, "cert-keys-1"), 1);
    drop(server);

    // No client certificate: PostgreSQL refuses (pg_hba.conf `cert`), and
    // the message names the keys that give one.
    let url = format!("postgres://certuser@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={ca}");
    let (code, stderr) = start_fails(&url, &[]);
    assert_eq!(code, Some(69), "{stderr}");
    assert!(stderr.contains("requires a valid client certificate"), "PostgreSQL's words: {stderr}");
    assert!(stderr.contains("none is configured: set database.cert_file and database.key_file"), "{stderr}");

    // A certificate for certuser from a CA the server does not trust: the
    // server's alert, and the file it was about.
    let with = |c: &ClientCert| {
        vec![format!("database.cert_file={}", c.cert.display()), format!("database.key_file={}", c.key.display())]
    };
    let (code, stderr) = start_fails(&url, &with(&pki.stranger));
    assert_eq!(code, Some(69), "{stderr}");
    let why = format!(
        "did not accept the client certificate {} (database.cert_file): UnknownCA",
        pki.stranger.cert.display()
    );
    assert!(stderr.contains(&why), "{stderr}");

    // A valid certificate, but for another user (CN=app).
    let (code, stderr) = start_fails(&url, &with(&pki.app));
    assert_eq!(code, Some(69), "{stderr}");
    assert!(stderr.contains("certificate authentication failed for user"), "PostgreSQL's words: {stderr}");
    assert!(stderr.contains(&format!("client certificate {}", pki.app.cert.display())), "{stderr}");
    assert!(stderr.contains("its CN must be that user name"), "{stderr}");

    // Key files that cannot serve: a configuration error (64) naming the
    // key and the file, before anything connects.
    let missing = pki.dir.join("missing.key");
    let url_with_key = |k: &Path| format!("{url}&sslcert={cert}&sslkey={}", k.display());
    let (code, stderr) = start_fails(&url_with_key(&missing), &[]);
    assert_eq!(code, Some(64), "{stderr}");
    let why =
        format!("database.key_file (sslkey in database.url): cannot read a private key from {}", missing.display());
    assert!(stderr.contains(&why) && stderr.contains("No such file"), "{stderr}");
    let (code, stderr) =
        start_fails(&url, &[format!("database.cert_file={cert}"), format!("database.key_file={cert}")]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains(&format!("database.key_file: {cert} holds no PEM private key")), "{stderr}");
    let (code, stderr) = start_fails(&url_with_key(&pki.app.key), &[]);
    assert_eq!(code, Some(64), "{stderr}");
    let why = format!(
        "database.cert_file (sslcert in database.url): {cert} is not the certificate of the private key in {} \
         (database.key_file (sslkey in database.url))",
        pki.app.key.display()
    );
    assert!(stderr.contains(&why), "{stderr}");
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
