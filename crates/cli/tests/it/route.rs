//! `souverain route` in front of three real Souverain replicas (`souverain serve` on the
//! default model) on loopback, with the control plane on at the router: answers identical to
//! a replica's own, prefix affinity that the replicas' prefix caches confirm, metering at the
//! router, and a replica killed under load without a failed request.

use crate::common;
use common::{free_port, raw_http, temp_dir};
use testkit::default_model;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_souverain");
const ADMIN_KEY: &str = "admin-key-for-the-route-test";

/// Kills the child when dropped, so a failing test leaves no server behind.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn replica(model: &Path, port: u16) -> Proc {
    let child = Command::new(BIN)
        .arg("serve")
        .arg("-m")
        .arg(model)
        .args(["--threads", "1", "--port", &port.to_string()])
        .args(["--kv-cache-tokens", "8192", "--max-seqs", "8"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port);
    Proc(child)
}

/// Decodes a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

struct Answer {
    status: u16,
    headers: String,
    body: String,
}

fn http(port: u16, method: &str, path: &str, key: Option<&str>, body: &str) -> Option<Answer> {
    let (status, head, body) = raw_http(port, method, path, key, body, Duration::from_secs(120))?;
    let headers = head.to_ascii_lowercase();
    let body = if headers.contains("transfer-encoding: chunked") {
        dechunk(&body)
    } else {
        body
    };
    Some(Answer {
        status,
        headers,
        body,
    })
}

fn header<'a>(answer: &'a Answer, name: &str) -> Option<&'a str> {
    answer.headers.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim)
    })
}

fn admin_json(data: &Path, args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .arg("admin")
        .arg("--data-dir")
        .arg(data)
        .args(["--region", "eu-west-paris"])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "admin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn metric(port: u16, name: &str) -> f64 {
    let page = http(port, "GET", "/metrics", None, "").unwrap().body;
    page.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn router_in_front_of_real_replicas() {
    let Some(model) = default_model() else { return };
    let dir = temp_dir("fleet");
    let ports = [free_port(), free_port(), free_port()];
    let mut replicas: Vec<Option<Proc>> = ports.iter().map(|&p| Some(replica(&model, p))).collect();
    let regions = ["eu-west-paris", "eu-west-paris", "eu-north-stockholm"];
    let mut config = "[scrape]\ninterval_ms = 100\n[proxy]\nretries = 2\n".to_owned();
    for (i, port) in ports.iter().enumerate() {
        config += &format!(
            "[[upstream]]\nname = \"replica-{i}\"\nurl = \"http://127.0.0.1:{port}\"\n\
             engine = \"souverain\"\nregion = \"{}\"\n",
            regions[i]
        );
    }
    let config_path = dir.join("router.toml");
    std::fs::write(&config_path, config).unwrap();
    let check = Command::new(BIN)
        .args(["route", "--check", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(check.status.success());
    // Keys: one organisation served in Paris only.
    let data = dir.join("data");
    let org = admin_json(
        &data,
        &["org", "create", "acme", "--regions", "eu-west-paris"],
    );
    let org_id = org["id"].as_str().unwrap().to_owned();
    let project = admin_json(&data, &["project", "create", &org_id, "app"]);
    let project_id = project["id"].as_str().unwrap().to_owned();
    let key = admin_json(&data, &["key", "create", &project_id, "k"]);
    let key = key["key"].as_str().unwrap().to_owned();
    let router_port = free_port();
    let _router = Proc(
        Command::new(BIN)
            .args(["route", "--config"])
            .arg(&config_path)
            .args(["--listen", &format!("127.0.0.1:{router_port}"), "--auth"])
            .arg("--data-dir")
            .arg(&data)
            .args(["--region", "eu-west-paris"])
            .env("SOUVERAIN_ADMIN_KEY", ADMIN_KEY)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(router_port);

    // Greedy answers through the router are a replica's own answers.
    let system = "You are a helpful assistant who answers in one short sentence. ".repeat(12);
    let ask = |question: &str| {
        json!({"model": "SmolLM2-135M-Instruct.Q4_1", "temperature": 0, "max_tokens": 12,
               "messages": [{"role": "system", "content": system},
                            {"role": "user", "content": question}]})
        .to_string()
    };
    let direct = http(
        ports[0],
        "POST",
        "/v1/chat/completions",
        None,
        &ask("What is Paris?"),
    )
    .unwrap();
    assert_eq!(direct.status, 200, "{}", direct.body);
    let routed = http(
        router_port,
        "POST",
        "/v1/chat/completions",
        Some(&key),
        &ask("What is Paris?"),
    )
    .unwrap();
    assert_eq!(routed.status, 200, "{}", routed.body);
    let content = |a: &Answer| -> Value {
        serde_json::from_str::<Value>(&a.body).unwrap()["choices"][0]["message"]["content"].clone()
    };
    assert_eq!(content(&routed), content(&direct));
    let usage: Value = serde_json::from_str::<Value>(&routed.body).unwrap()["usage"].clone();

    // The same system prompt goes back to the same replica, whose prefix cache then hits.
    let home = header(&routed, "x-souverain-upstream").unwrap().to_owned();
    assert_ne!(
        home, "replica-2",
        "an organisation served in Paris only reached Stockholm"
    );
    let home_port = ports[home
        .trim_start_matches("replica-")
        .parse::<usize>()
        .unwrap()];
    let hits_before = metric(home_port, "souverain_prefix_cache_hits_total");
    for q in ["What is Rome?", "What is Oslo?", "What is Bern?"] {
        let a = http(
            router_port,
            "POST",
            "/v1/chat/completions",
            Some(&key),
            &ask(q),
        )
        .unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(header(&a, "x-souverain-upstream"), Some(home.as_str()));
    }
    let hits_after = metric(home_port, "souverain_prefix_cache_hits_total");
    assert!(hits_after > hits_before, "{hits_before} -> {hits_after}");

    // A stream through the router ends with [DONE] and the usage chunk is not shown unasked.
    let mut streamed: Value = serde_json::from_str(&ask("Say hi")).unwrap();
    streamed["stream"] = json!(true);
    let a = http(
        router_port,
        "POST",
        "/v1/chat/completions",
        Some(&key),
        &streamed.to_string(),
    )
    .unwrap();
    assert_eq!(a.status, 200);
    assert!(a.body.trim_end().ends_with("data: [DONE]"), "{}", a.body);
    assert!(!a.body.contains("\"usage\":{"), "{}", a.body);

    // Metered at the router: the first request's record carries the replica's token counts.
    // The router writes usage records behind the responses (grouped every 10 ms), so give
    // them a moment to land.
    let deadline = Instant::now() + Duration::from_secs(10);
    let records = loop {
        let records = admin_json(&data, &["usage", "--format", "json"]);
        let ok = records
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["status"] == "ok")
            .count();
        if ok >= 5 || Instant::now() > deadline {
            break records;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let records = records.as_array().unwrap();
    let ok: Vec<&Value> = records.iter().filter(|r| r["status"] == "ok").collect();
    assert_eq!(ok.len(), 5, "{records:?}");
    assert!(
        ok.iter()
            .any(|r| r["prompt_tokens"] == usage["prompt_tokens"]
                && r["completion_tokens"] == usage["completion_tokens"])
    );
    // ...and the energy the replica's engine attributed to it (streams included).
    let joules = usage["energy_joules"].as_f64().unwrap();
    assert!(
        ok.iter().any(
            |r| r["energy_uj"].as_i64() == Some((joules * 1e6).round() as i64)
                && r["energy_source"] == "modelled"
        ),
        "{ok:?}"
    );
    assert!(
        ok.iter()
            .all(|r| r["energy_uj"].as_i64().is_some_and(|uj| uj > 0)),
        "{ok:?}"
    );

    // Kill the Paris replica that is not home... and then home itself: Paris-only requests
    // that had not begun keep being served while a Paris replica lives.
    let other = if home == "replica-0" { 1 } else { 0 };
    replicas[other] = None;
    let mut failed = 0;
    for i in 0..6 {
        let a = http(
            router_port,
            "POST",
            "/v1/chat/completions",
            Some(&key),
            &ask(&format!("Number {i}?")),
        )
        .unwrap();
        if a.status != 200 {
            failed += 1;
        }
        assert_eq!(header(&a, "x-souverain-upstream"), Some(home.as_str()));
    }
    assert_eq!(failed, 0);
    // Every Paris replica down: 503, never Stockholm.
    let home_index = home
        .trim_start_matches("replica-")
        .parse::<usize>()
        .unwrap();
    replicas[home_index] = None;
    let a = http(
        router_port,
        "POST",
        "/v1/chat/completions",
        Some(&key),
        &ask("Anyone?"),
    )
    .unwrap();
    assert!(
        a.status == 503 || a.status == 502,
        "{} {}",
        a.status,
        a.body
    );
    assert!(replicas[2].is_some());
}
