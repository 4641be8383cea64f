//! Third-party clients against memdial on both backends: pymemcache
//! exercising every command, meta-memcache (a meta-protocol client) doing
//! its normal work, and libmemcached's `memcapable -a`.

mod common;

use std::process::Command;

use common::client::text;
use common::procs::{Memcached, Memdial};

fn pymemcache(port: u16) {
    python_check(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/pymemcache_check.py"
        ),
        port,
    );
}

fn meta_memcache(port: u16) {
    python_check(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/meta_memcache_check.py"
        ),
        port,
    );
}

/// Runs a client check script against `port`; it prints `all checks
/// passed` when every check passed.
fn python_check(script: &str, port: u16) {
    let out = Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .output()
        .expect("python3 (the README's test command installs the client libraries)");
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
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

#[test]
fn meta_memcache_on_embedded() {
    meta_memcache(Memdial::embedded().port);
}

#[test]
fn meta_memcache_on_memcached() {
    let m = Memcached::start();
    meta_memcache(Memdial::over(&m).port);
}

/// The check script's expectations hold for memcached 1.6.18 itself.
#[test]
fn meta_memcache_on_memcached_direct() {
    meta_memcache(Memcached::start().port);
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
