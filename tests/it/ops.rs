//! Operations: SIGHUP reloads the settings that can change live, reports
//! the rest as needing a restart, and keeps the running configuration when
//! the new file is bad.

use serde_json::Value;

use crate::support::*;

fn write(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).expect("write config");
}

#[test]
fn sighup_reloads_live_settings_and_keeps_the_rest() {
    let path = std::env::temp_dir().join(unique("reload")).with_extension("toml");
    write(&path, "[ingest]\nmax_events_per_request = 5\n");
    let server = Ingestd::new().config_file(&path.display().to_string()).start();
    let three: Vec<Value> = events(&unique("r3"), 3);
    assert_eq!(server.post_batch(&three).status, 200);
    // Lower a live limit, change a restart-only key, and the log level.
    write(&path, "[ingest]\nmax_events_per_request = 2\n[pipeline]\nring_capacity = 7\n[log]\nlevel = \"debug\"\n");
    // Server::sighup returns once the reload has logged its last line (the
    // restart-only keys are logged before it).
    let line = server.sighup();
    assert!(line.contains("SIGHUP: configuration reloaded"), "{line}");
    assert_eq!(server.post_batch(&events(&unique("r3b"), 3)).status, 413, "the new limit in force");
    let stderr = server.stderr();
    assert!(stderr.contains("needs a restart") && stderr.contains("pipeline.ring_capacity"), "{stderr}");
    assert!(stderr.contains("ingest.max_events_per_request"), "{stderr}");
    assert_eq!(server.post_batch(&events(&unique("r2"), 2)).status, 200);
    // A bad file: refused with the key named; the running config stays.
    write(&path, "[ingest]\nmax_events_per_request = 100\nnot_a_key = 1\n");
    let line = server.sighup();
    assert!(line.contains("reload refused"), "{line}");
    assert!(server.stderr().contains("ingest.not_a_key"), "{}", server.stderr());
    assert_eq!(server.post_batch(&events(&unique("r3c"), 3)).status, 413, "old limit kept");
    let _ = std::fs::remove_file(&path);
}
