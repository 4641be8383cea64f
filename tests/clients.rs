//! Third-party clients against memdial on both backends: pymemcache
//! exercising every command, and libmemcached's `memcapable -a`.

mod common;

use std::process::Command;

use common::client::text;
use common::procs::{Memcached, Memdial};

fn pymemcache(port: u16) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/pymemcache_check.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .output()
        .expect("python3 (the README's test command installs pymemcache)");
    assert!(
        out.status.success(),
        "pymemcache check failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("all checks passed"));
}

#[test]
fn pymemcache_on_embedded() {
    pymemcache(Memdial::embedded().port);
}

#[test]
fn pymemcache_on_memcached() {
    let m = Memcached::start();
    pymemcache(Memdial::over(&m).port);
}

/// memcapable from Debian's libmemcached-tools, every ascii test in one run
/// ("ascii quit" needs "ascii version" to have run first).
fn memcapable(port: u16) {
    let out = Command::new("memccapable")
        .args(["-a", "-h", "127.0.0.1", "-p", &port.to_string()])
        .output()
        .expect("memccapable (libmemcached-tools; the README's test command installs it)");
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "memcapable failed:\n{report}");
    let passed = report.lines().filter(|l| l.ends_with("[pass]")).count();
    let failed: Vec<_> = report
        .lines()
        .filter(|l| l.contains("[fail]") || l.contains("FAIL"))
        .collect();
    assert!(failed.is_empty(), "{failed:?}\n{report}");
    assert!(passed >= 20, "only {passed} ascii tests passed:\n{report}");
}

#[test]
fn memcapable_on_embedded() {
    memcapable(Memdial::embedded().port);
}

#[test]
fn memcapable_on_memcached() {
    let m = Memcached::start();
    memcapable(Memdial::over(&m).port);
}
