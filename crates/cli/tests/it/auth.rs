//! `serve --auth` and `souverain admin` as a user runs them: keys made with the CLI, a real
//! server on the default model, and a `kill -9` under load after which every response a
//! client received is found metered and audited.

use crate::common;
use common::{free_port, raw_http, temp_dir};
use testkit::default_model;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_souverain");
const REGION: &str = "eu-west-paris";
const ADMIN_KEY: &str = "admin-key-for-the-cli-test";

/// Where a test's control plane lives: a data directory (with SQLite, unless `database_url`
/// names a PostgreSQL database).
struct StoreAt {
    data: std::path::PathBuf,
    database_url: Option<String>,
}

impl StoreAt {
    fn sqlite(data: &Path) -> Self {
        StoreAt {
            data: data.to_owned(),
            database_url: None,
        }
    }

    fn args(&self) -> Vec<std::ffi::OsString> {
        let mut args = vec!["--data-dir".into(), self.data.clone().into_os_string()];
        if let Some(url) = &self.database_url {
            args.extend(["--database-url".into(), url.into()]);
        }
        args
    }
}

fn admin(data: &Path, args: &[&str]) -> Output {
    admin_at(&StoreAt::sqlite(data), args)
}

fn admin_at(store: &StoreAt, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("admin")
        .args(store.args())
        .args(["--region", REGION])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn admin_json(data: &Path, args: &[&str]) -> serde_json::Value {
    admin_json_at(&StoreAt::sqlite(data), args)
}

fn admin_json_at(store: &StoreAt, args: &[&str]) -> serde_json::Value {
    let out = admin_at(store, args);
    assert!(
        out.status.success(),
        "admin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn start_server(model: &Path, store: &StoreAt, port: u16) -> Child {
    let child = Command::new(BIN)
        .arg("serve")
        .arg("-m")
        .arg(model)
        .args(["--threads", "1", "--port", &port.to_string(), "--auth"])
        .args(store.args())
        .args(["--region", REGION])
        .env("SOUVERAIN_ADMIN_KEY", ADMIN_KEY)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// One HTTP/1.1 request; the status and body, or `None` if the connection broke first.
fn http(port: u16, method: &str, path: &str, key: &str, body: &str) -> Option<(u16, String)> {
    let (status, _, body) = raw_http(port, method, path, Some(key), body, Duration::from_secs(30))?;
    // A killed server may cut a body short; only a whole JSON body counts as received.
    serde_json::from_str::<serde_json::Value>(&body).ok()?;
    Some((status, body))
}

#[test]
fn admin_cli_manages_keys_and_verifies_the_audit_log() {
    let data = temp_dir("admin");
    let org = admin_json(&data, &["org", "create", "Acme"]);
    assert_eq!(org["allowed_regions"], serde_json::json!([REGION]));
    let org_id = org["id"].as_str().unwrap();
    let project = admin_json(
        &data,
        &["project", "create", org_id, "bot", "--retention-secs", "60"],
    );
    let project_id = project["id"].as_str().unwrap();
    let key = admin_json(
        &data,
        &[
            "key",
            "create",
            project_id,
            "k",
            "--rpm",
            "5",
            "--budget-tokens",
            "100",
            "--budget-period",
            "day",
        ],
    );
    assert!(key["key"].as_str().unwrap().starts_with("sk-sov-"));
    assert_eq!(key["record"]["policy"]["budget"]["period"], "day");
    let keys = admin_json(&data, &["key", "list", project_id]);
    assert_eq!(keys.as_array().unwrap().len(), 1);
    let key_id = keys[0]["id"].as_str().unwrap();
    assert!(admin(&data, &["key", "revoke", key_id]).status.success());

    // The store options are taken after the subcommand too, where users type them.
    let verify = Command::new(BIN)
        .args(["admin", "audit", "verify", "--region", REGION, "--data-dir"])
        .arg(&data)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "admin audit verify --data-dir: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // Mistakes are refused with a message, not a panic.
    for bad in [
        vec!["org", "create", ""],
        vec!["project", "create", "org_missing", "p"],
        vec!["key", "revoke", "missing"],
        vec!["usage", "--from", "yesterday"],
        vec!["usage", "--group-by", "planet"],
    ] {
        let out = admin(&data, &bad);
        assert!(!out.status.success(), "{bad:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("error:") && !stderr.contains("panicked"),
            "{stderr}"
        );
    }

    let out = admin(&data, &["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("4 entries"));

    // Tampering with the file is caught and named.
    let db = data.join("control.sqlite3");
    let conn = rusqlite_free_edit(&db);
    assert!(conn, "could not edit the database");
    let out = admin(&data, &["audit", "verify"]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("TAMPERED: entry #2 was edited"), "{stdout}");
    let _ = std::fs::remove_dir_all(&data);
}

/// Edits audit entry #2 with the `sqlite3` shell if there is one, else through `python3`.
fn rusqlite_free_edit(db: &Path) -> bool {
    let sql = "UPDATE audit_log SET actor = 'mallory' WHERE seq = 2;";
    let by_shell = Command::new("sqlite3").arg(db).arg(sql).status();
    if by_shell.is_ok_and(|s| s.success()) {
        return true;
    }
    let script = format!(
        "import sqlite3; c = sqlite3.connect({:?}); c.execute({sql:?}); c.commit()",
        db.display().to_string()
    );
    Command::new("python3")
        .args(["-c", &script])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn killing_the_server_under_load_loses_no_committed_usage_on_sqlite() {
    let Some(model) = default_model() else { return };
    let data = temp_dir("kill");
    kill_under_load(&model, &StoreAt::sqlite(&data));
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn killing_the_server_under_load_loses_no_committed_usage_on_postgres() {
    let Some(model) = default_model() else { return };
    let Some(url) = testkit::database_url() else {
        return;
    };
    // A database of its own, dropped at the end.
    let name = format!("souverain_kill_{}", std::process::id());
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    // One statement per call: neither may run inside a transaction block.
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        client.batch_execute(&sql).unwrap();
    }
    let own_url = match url.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => panic!("a database URL ends with the database: {url}"),
    };
    let data = temp_dir("kill-pg");
    kill_under_load(
        &model,
        &StoreAt {
            data: data.clone(),
            database_url: Some(own_url),
        },
    );
    let _ = std::fs::remove_dir_all(&data);
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .unwrap();
}

/// The key's budget counter and the tokens of its usage records.
fn counted_and_recorded(store: &StoreAt, key_id: &str) -> (u64, u64) {
    let budget = admin_json_at(store, &["key", "budget", key_id]);
    let usage = admin_json_at(store, &["usage", "--key", key_id]);
    let recorded = usage
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
        .sum();
    (budget["counted_tokens"].as_u64().unwrap(), recorded)
}

/// Load, `kill -9`, restart: every answer received is metered and audited, and once the
/// restarted server has given back what the killed one held for requests in flight, the
/// key's budget counter equals the sum of its usage records.
fn kill_under_load(model: &Path, store: &StoreAt) {
    let org = admin_json_at(store, &["org", "create", "Acme"]);
    let project = admin_json_at(
        store,
        &["project", "create", org["id"].as_str().unwrap(), "bot"],
    );
    let key = admin_json_at(
        store,
        &[
            "key",
            "create",
            project["id"].as_str().unwrap(),
            "load",
            "--budget-tokens",
            "100000000",
            "--budget-period",
            "month",
        ],
    );
    let key_id = key["record"]["id"].as_str().unwrap().to_owned();
    let key = key["key"].as_str().unwrap().to_owned();

    let port = free_port();
    let mut server = start_server(model, store, port);
    let body = r#"{"model":"SmolLM2-135M-Instruct.Q4_1","prompt":"The capital of France is","max_tokens":3,"temperature":0}"#;
    // The served model id is the file name: check the key works before loading.
    let (status, first) =
        http(port, "POST", "/v1/completions", &key, body).expect("a first answer");
    assert_eq!(status, 200, "{first}");

    let received = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (received, stop, key) = (received.clone(), stop.clone(), key.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match http(port, "POST", "/v1/completions", &key, body) {
                        Some((200, body)) => {
                            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
                            received
                                .lock()
                                .unwrap()
                                .push(json["id"].as_str().unwrap().to_owned());
                        }
                        Some((status, body)) => panic!("{status}: {body}"),
                        None => break,
                    }
                }
            })
        })
        .collect();
    // Let the load run until a good number of requests went through, then kill -9.
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.lock().unwrap().len() < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill().unwrap();
    server.wait().unwrap();
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.join().unwrap();
    }
    let mut received = received.lock().unwrap().clone();
    received.push(
        serde_json::from_str::<serde_json::Value>(&first).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    assert!(
        received.len() >= 21,
        "only {} answers before the kill",
        received.len()
    );

    // Every answer a client received was metered and audited.
    let usage = admin_json_at(store, &["usage"]);
    let metered: Vec<&str> = usage
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    for id in &received {
        assert!(
            metered.contains(&id.as_str()),
            "{id} was answered but not metered"
        );
    }
    let out = admin_at(store, &["audit", "verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let entries: usize = stdout.split(' ').next().unwrap().parse().unwrap();
    assert!(entries >= 3 + metered.len(), "{stdout}");
    // The killed server's reservations for requests in flight are still counted.
    let (counted, recorded) = counted_and_recorded(store, &key_id);
    assert!(counted >= recorded, "{counted} < {recorded}");
    eprintln!("after kill -9: budget counter {counted}, usage records {recorded}");

    // The server comes back on the same data and gives back what the dead one held.
    let mut server = start_server(model, store, port);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut now = counted_and_recorded(store, &key_id);
    while now.0 != now.1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        now = counted_and_recorded(store, &key_id);
    }
    assert_eq!(
        now.0, now.1,
        "budget counter vs usage records after the restart"
    );
    let answer = http(port, "POST", "/v1/completions", &key, body);
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(answer.map(|(s, _)| s), Some(200));
    if counted > recorded {
        let log = admin_at(store, &["audit", "list"]);
        let log = String::from_utf8_lossy(&log.stdout);
        assert!(log.contains("\"budget.release\""), "{log}");
    }
}
