//! What the container deployment relies on, without Docker: `memdial
//! probe` (the compose health check) against a real node and against
//! answers it must refuse, and the compose files themselves: the proxy
//! config they bake in loads and validates through memdial's own loader,
//! and `docker-compose.yml` agrees with it (ports, node ids, health checks,
//! readiness ordering).

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::procs::{Memdial, free_port, memdial_bin};
use memdial::config::Config;
use serde_yaml_ng::Value;

fn probe(url: &str, timeout_ms: u64) -> Output {
    Command::new(memdial_bin())
        .args([
            "probe",
            "--url",
            url,
            "--timeout-ms",
            &timeout_ms.to_string(),
        ])
        .output()
        .expect("run memdial probe")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A one-connection HTTP server on a fresh port that answers `reply` (or
/// nothing, holding the connection, when `reply` is empty) to the first
/// request; returns its port and the request it read.
fn one_shot_server(reply: &'static str) -> (u16, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut req = Vec::new();
        let mut buf = [0u8; 512];
        while !req.ends_with(b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        if reply.is_empty() {
            // Silent: hold the connection until the prober gives up.
            let _ = s.read(&mut buf);
        } else {
            let _ = s.write_all(reply.as_bytes());
        }
        String::from_utf8_lossy(&req).into_owned()
    });
    (port, handle)
}

#[test]
fn probe_passes_on_200_and_fails_on_anything_else() {
    let node = Memdial::embedded();
    let base = format!("http://127.0.0.1:{}", node.admin_port);

    let ok = probe(&format!("{base}/health"), 2000);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    let missing = probe(&format!("{base}/no-such-path"), 2000);
    assert_eq!(missing.status.code(), Some(1), "404 is not healthy");
    assert!(
        stderr(&missing).contains("HTTP 404"),
        "{}",
        stderr(&missing)
    );

    // A name works where an IP does.
    let named = probe(
        &format!("http://localhost:{}/health", node.admin_port),
        2000,
    );
    assert_eq!(named.status.code(), Some(0), "{}", stderr(&named));

    let closed = probe(&format!("http://127.0.0.1:{}/ready", free_port()), 2000);
    assert_eq!(closed.status.code(), Some(1));
    assert!(
        stderr(&closed).contains("connecting"),
        "{}",
        stderr(&closed)
    );
}

#[test]
fn probe_fails_on_503_and_sends_a_plain_get() {
    let (port, server) =
        one_shot_server("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nnot ready");
    let o = probe(&format!("http://127.0.0.1:{port}/ready"), 2000);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("HTTP 503"), "{}", stderr(&o));
    let request = server.join().expect("server thread");
    assert!(
        request.starts_with("GET /ready HTTP/1.0\r\n"),
        "{request:?}"
    );
    assert!(
        request.contains(&format!("\r\nHost: 127.0.0.1:{port}\r\n")),
        "{request:?}"
    );

    let (port, _server) = one_shot_server("HTTP/1.0 200 OK\r\n\r\nready");
    let o = probe(&format!("http://127.0.0.1:{port}/ready"), 2000);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn probe_gives_up_on_a_silent_server_within_its_timeout() {
    let (port, _server) = one_shot_server("");
    let started = Instant::now();
    let o = probe(&format!("http://127.0.0.1:{port}/ready"), 300);
    let took = started.elapsed();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no answer within 300 ms"),
        "{}",
        stderr(&o)
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn compose() -> Value {
    let text = std::fs::read_to_string(repo("docker-compose.yml")).expect("docker-compose.yml");
    let mut v: Value = serde_yaml_ng::from_str(&text).expect("docker-compose.yml is YAML");
    // `<<: *memdial` as compose reads it.
    v.apply_merge().expect("merge keys");
    v
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|s| match s {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => panic!("not a string: {other:?}"),
        })
        .collect()
}

#[test]
fn the_compose_proxy_config_loads_and_names_services() {
    let config = Config::load(&repo("deploy/proxy.compose.yaml")).expect("load and validate");
    assert_eq!(config.nodes.len(), 3);
    for n in &config.nodes {
        assert_eq!(n.internal.host(), format!("memdial-{}", n.id));
        assert_eq!(
            n.memcached.as_deref(),
            Some(format!("memcached-{}:11211", n.id).as_str())
        );
        // Reachable through published ports and by the in-container probe.
        assert_eq!(n.client.host(), "0.0.0.0");
        assert_eq!(n.admin.host(), "0.0.0.0");
    }
}

/// docker-compose.yml and the config it bakes in agree: every memdial
/// service runs its node, publishes its client port, probes its own admin
/// port's `/ready`, and starts once its memcached is healthy; every
/// memcached listens where the config says and has a health check.
#[test]
fn docker_compose_agrees_with_the_compose_proxy_config() {
    let config = Config::load(&repo("deploy/proxy.compose.yaml")).expect("load");
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).expect("Dockerfile");
    let compose = compose();
    let services = compose["services"].as_mapping().expect("services");
    assert_eq!(services.len(), 6, "3 memcached + 3 memdial");
    let network = compose["networks"]["memdial"]["driver"].as_str();
    assert_eq!(network, Some("bridge"));
    for n in &config.nodes {
        let name = format!("memdial-{}", n.id);
        let s = &compose["services"][name.as_str()];
        assert!(s.is_mapping(), "no service {name}");
        assert!(
            s.get("network_mode").is_none(),
            "{name}: no host networking"
        );
        assert_eq!(strings(&s["networks"]), ["memdial"], "{name}");
        let command = strings(&s["command"]);
        let config_path = &command[command.iter().position(|a| a == "--config").unwrap() + 1];
        assert!(
            dockerfile.contains(&format!("COPY deploy/proxy.compose.yaml {config_path}")),
            "{name}: the image has {config_path}"
        );
        assert_eq!(
            &command[command.iter().position(|a| a == "--node").unwrap() + 1],
            &n.id.to_string()
        );
        let port = n.client.port();
        assert!(
            strings(&s["ports"]).contains(&format!("{port}:{port}")),
            "{name} publishes its client port {port}"
        );
        let health = strings(&s["healthcheck"]["test"]);
        assert_eq!(
            health,
            [
                "CMD",
                "memdial",
                "probe",
                "--url",
                &format!("http://127.0.0.1:{}/ready", n.admin.port())
            ],
            "{name}"
        );
        let memcached = n.memcached.as_deref().unwrap();
        let (host, mport) = memcached.split_once(':').unwrap();
        assert_eq!(
            s["depends_on"][host]["condition"].as_str(),
            Some("service_healthy"),
            "{name} waits for {host}"
        );
        let m = &compose["services"][host];
        assert_eq!(m["image"].as_str(), Some("memcached:1.6.18"), "{host}");
        assert_eq!(strings(&m["networks"]), ["memdial"], "{host}");
        let mcommand = strings(&m["command"]);
        assert_eq!(
            &mcommand[mcommand.iter().position(|a| a == "-p").unwrap() + 1],
            mport
        );
        assert!(
            !mcommand.contains(&"-l".to_string()),
            "{host} listens on its network"
        );
        assert!(
            !mcommand.contains(&"-M".to_string()),
            "{host}: today's flags"
        );
        let mhealth = strings(&m["healthcheck"]["test"]).join(" ");
        assert!(
            mhealth.contains(&format!("/dev/tcp/127.0.0.1/{mport}")),
            "{mhealth}"
        );
    }
    // Every published port is distinct.
    let mut published = BTreeMap::new();
    for (name, s) in services {
        if let Some(ports) = s.get("ports") {
            for p in strings(ports) {
                if let Some(other) = published.insert(p.clone(), name.clone()) {
                    panic!("{p} published by {other:?} and {name:?}");
                }
            }
        }
    }
}

/// The Dockerfile builds its dependencies first, against stub sources.
/// Cargo reads every target Cargo.toml names before it builds anything, so
/// that step must leave a file for each (a bench added without one broke
/// the image's build). Its stub `RUN`, run here in a directory holding only
/// Cargo.toml and Cargo.lock, then a build of a binary that does not exist:
/// cargo answers that there is no such binary once it has read the
/// manifest, and builds nothing.
#[test]
fn the_dockerfile_stub_step_leaves_every_target_cargo_reads() {
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).expect("Dockerfile");
    let joined = dockerfile.replace("\\\n", " ");
    let stubs = joined
        .lines()
        .filter_map(|l| l.strip_prefix("RUN "))
        .find(|r| r.trim_start().starts_with("mkdir -p src benches"))
        .expect("a RUN that makes the stub sources");
    assert!(
        !stubs.contains("cargo "),
        "the stub step only writes files: {stubs}"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    for f in ["Cargo.toml", "Cargo.lock"] {
        std::fs::copy(repo(f), dir.path().join(f)).expect(f);
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg(stubs)
        .current_dir(dir.path())
        .output()
        .expect("sh");
    assert!(out.status.success(), "stub step: {}", stderr(&out));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--locked", "--offline", "--bin", "no-such-binary"])
        .arg("--target-dir")
        .arg(dir.path().join("target"))
        .current_dir(dir.path())
        .output()
        .expect("cargo");
    let err = stderr(&out);
    assert!(
        err.contains("no bin target named `no-such-binary`"),
        "cargo did not read the stub manifest through: {err}"
    );
}
