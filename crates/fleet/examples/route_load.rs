//! Load generator for `scripts/bench/route` (not a test): open-loop latency at a fixed rate,
//! chat sessions sharing system prompts (time to first token), requests from organisations
//! with different allowed regions, and parallel requests at a budget's edge.
//!
//! ```text
//! route_load latency  URL KEY RATE SECONDS
//! route_load sessions URL KEY SESSIONS PROMPTS TURNS PROMPT_WORDS MAX_TOKENS [STAGGER_MS]
//! route_load regions  URL KEYS_FILE REQUESTS UPSTREAM=REGION,...
//! route_load budget   URL KEY PARALLEL MAX_TOKENS
//! route_load failover URL KEY SECONDS CONCURRENCY
//! ```
//! `KEY` may be `-` for none. Output is one line of `name=value` pairs per measurement.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use souverain_fleet::{HttpClient, http_client};

type Result<T> = std::result::Result<T, String>;

/// The model asked for by `sessions` and `budget` (real replicas check it).
fn model_id() -> String {
    std::env::var("ROUTE_LOAD_MODEL").unwrap_or_else(|_| "SmolLM2-135M-Instruct.Q4_1".to_owned())
}

fn request(url: &str, path: &str, key: Option<&str>, body: &Value) -> axum::http::Request<Body> {
    let mut r = axum::http::Request::post(format!("{url}{path}"))
        .header("content-type", "application/json");
    if let Some(key) = key {
        r = r.header("authorization", format!("Bearer {key}"));
    }
    r.body(Body::from(body.to_string()))
        .expect("a valid request")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{name}_n={} {name}_p50_ms={:.3} {name}_p90_ms={:.3} {name}_p99_ms={:.3} {name}_max_ms={:.3}",
        v.len(),
        percentile(&v, 0.5),
        percentile(&v, 0.9),
        percentile(&v, 0.99),
        v.last().copied().unwrap_or(f64::NAN)
    )
}

/// One non-streamed request; (status, upstream, latency ms).
async fn one(
    client: &HttpClient,
    req: axum::http::Request<Body>,
) -> Result<(u16, Option<String>, f64, Value)> {
    let start = Instant::now();
    let response = client.request(req).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let upstream = response
        .headers()
        .get("x-souverain-upstream")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let ms = start.elapsed().as_secs_f64() * 1e3;
    Ok((
        status,
        upstream,
        ms,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    ))
}

async fn latency(client: HttpClient, url: &str, key: Option<&str>, rate: f64, secs: f64) {
    let body = json!({"model": "standin-model", "max_tokens": 1,
                      "messages": [{"role": "user", "content": "ping"}]});
    let total = (rate * secs) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = start + interval * u32::try_from(i).unwrap_or(u32::MAX);
        tokio::time::sleep_until(due.into()).await;
        let client = client.clone();
        let req = request(url, "/v1/chat/completions", key, &body);
        tasks.push(tokio::spawn(async move { one(&client, req).await }));
    }
    let mut lat = Vec::with_capacity(total);
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok(Ok((200, _, ms, _))) => lat.push(ms),
            _ => errors += 1,
        }
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    println!(
        "rate={rate} achieved_rps={achieved:.0} errors={errors} {}",
        summary("latency", lat)
    );
}

/// Streams one chat; (time to first content ms, whole ms, assistant text).
async fn stream_chat(
    client: &HttpClient,
    url: &str,
    key: Option<&str>,
    messages: &[Value],
    max_tokens: u64,
) -> Result<(f64, f64, String)> {
    let body = json!({"model": model_id(), "messages": messages, "max_tokens": max_tokens,
                      "temperature": 0, "stream": true});
    let start = Instant::now();
    let response = client
        .request(request(url, "/v1/chat/completions", key, &body))
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    let mut body = response.into_body();
    let mut ttft = None;
    let mut buffer = String::new();
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buffer.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(payload) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if payload == "[DONE]" {
                continue;
            }
            if let Ok(v) = serde_json::from_str::<Value>(payload)
                && let Some(piece) = v["choices"][0]["delta"]["content"].as_str()
                && !piece.is_empty()
            {
                ttft.get_or_insert_with(|| start.elapsed().as_secs_f64() * 1e3);
                text.push_str(piece);
            }
        }
    }
    let total = start.elapsed().as_secs_f64() * 1e3;
    Ok((ttft.unwrap_or(total), total, text))
}

#[allow(clippy::too_many_arguments)]
async fn sessions(
    client: HttpClient,
    url: &str,
    key: Option<&str>,
    sessions: usize,
    prompts: usize,
    turns: usize,
    words: usize,
    max_tokens: u64,
    stagger: Duration,
) {
    let vocabulary = [
        "policy", "customer", "invoice", "contract", "region", "data", "service", "answer",
        "request", "support", "account", "review", "market", "energy", "network", "report",
    ];
    let systems: Vec<String> = (0..prompts)
        .map(|p| {
            let mut s = format!("You are assistant number {p} of the Souverain benchmark. ");
            for w in 0..words {
                s.push_str(vocabulary[(w * 7 + p * 13 + w / 5) % vocabulary.len()]);
                s.push(' ');
            }
            s
        })
        .collect();
    let start = Instant::now();
    let url = Arc::new(url.to_owned());
    let key = key.map(str::to_owned);
    let mut tasks = Vec::new();
    for s in 0..sessions {
        let client = client.clone();
        let url = Arc::clone(&url);
        let key = key.clone();
        let system = systems[s % prompts].clone();
        tasks.push(tokio::spawn(async move {
            // Sessions open one after another (users do not all press enter in the same
            // millisecond); all 64 are open together once the ramp is over.
            tokio::time::sleep(stagger * u32::try_from(s).unwrap_or(0)).await;
            let mut messages = vec![json!({"role": "system", "content": system})];
            let mut out = Vec::new();
            for t in 0..turns {
                messages.push(json!({"role": "user", "content": format!("Session {s}, question {t}: summarise.")}));
                match stream_chat(&client, &url, key.as_deref(), &messages, max_tokens).await {
                    Ok((ttft, _, text)) => {
                        out.push(Ok(ttft));
                        messages.push(json!({"role": "assistant", "content": text}));
                    }
                    Err(e) => out.push(Err(e)),
                }
            }
            out
        }));
    }
    let mut ttfts = Vec::new();
    let mut errors = 0;
    for t in tasks {
        for r in t.await.unwrap_or_default() {
            match r {
                Ok(ms) => ttfts.push(ms),
                Err(_) => errors += 1,
            }
        }
    }
    println!(
        "sessions={sessions} prompts={prompts} turns={turns} stagger_ms={} errors={errors} wall_s={:.1} {}",
        stagger.as_millis(),
        start.elapsed().as_secs_f64(),
        summary("ttft", ttfts)
    );
}

async fn regions(
    client: HttpClient,
    url: &str,
    keys_file: &str,
    requests: usize,
    map: &str,
) -> Result<()> {
    // keys file: one line per organisation: KEY REGION[,REGION...]
    let text = std::fs::read_to_string(keys_file).map_err(|e| e.to_string())?;
    let orgs: Vec<(String, Vec<String>)> = text
        .lines()
        .filter_map(|l| {
            let (k, r) = l.split_once(' ')?;
            Some((k.to_owned(), r.split(',').map(str::to_owned).collect()))
        })
        .collect();
    let upstream_region: HashMap<String, String> = map
        .split(',')
        .filter_map(|p| p.split_once('=').map(|(a, b)| (a.to_owned(), b.to_owned())))
        .collect();
    let orgs = Arc::new(orgs);
    let upstream_region = Arc::new(upstream_region);
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..requests {
        let (client, orgs, map, sem) = (
            client.clone(),
            Arc::clone(&orgs),
            Arc::clone(&upstream_region),
            Arc::clone(&sem),
        );
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let (key, allowed) = &orgs[i % orgs.len()];
            let body = json!({"model": "standin-model", "max_tokens": 1,
                              "messages": [{"role": "user", "content": format!("request {i}")}]});
            match one(
                &client,
                request(&url, "/v1/chat/completions", Some(key), &body),
            )
            .await
            {
                Ok((200, Some(up), _, _)) => {
                    let region = map.get(&up).cloned().unwrap_or_default();
                    if allowed.contains(&region) {
                        "inside"
                    } else {
                        "outside"
                    }
                }
                Ok((503, _, _, _)) => "unavailable",
                _ => "error",
            }
        }));
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in tasks {
        *counts.entry(t.await.unwrap_or("error")).or_default() += 1;
    }
    println!(
        "requests={requests} orgs={} inside={} outside={} unavailable={} errors={}",
        orgs.len(),
        counts.get("inside").unwrap_or(&0),
        counts.get("outside").unwrap_or(&0),
        counts.get("unavailable").unwrap_or(&0),
        counts.get("error").unwrap_or(&0)
    );
    Ok(())
}

async fn budget(client: HttpClient, url: &str, key: &str, parallel: usize, max_tokens: u64) {
    let mut tasks = Vec::new();
    for i in 0..parallel {
        let client = client.clone();
        let req = request(
            url,
            "/v1/chat/completions",
            Some(key),
            &json!({
                "model": model_id(), "max_tokens": max_tokens, "temperature": 1, "seed": i,
                "messages": [{"role": "user", "content": format!("Write about the number {i}.")}]
            }),
        );
        tasks.push(tokio::spawn(async move { one(&client, req).await }));
    }
    let (mut ok, mut refused, mut other, mut tokens) = (0, 0, 0, 0u64);
    let mut upstreams = std::collections::HashSet::new();
    for t in tasks {
        match t.await {
            Ok(Ok((200, up, _, body))) => {
                ok += 1;
                upstreams.extend(up);
                tokens += body["usage"]["total_tokens"].as_u64().unwrap_or(0);
            }
            Ok(Ok((429, _, _, _))) => refused += 1,
            _ => other += 1,
        }
    }
    println!(
        "parallel={parallel} max_tokens={max_tokens} ok={ok} refused_429={refused} other={other} \
         replicas_used={} tokens_answered={tokens}",
        upstreams.len()
    );
}

async fn failover(client: HttpClient, url: &str, key: Option<&str>, secs: f64, concurrency: usize) {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let url = Arc::new(url.to_owned());
    let key = key.map(str::to_owned);
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let (client, url, key) = (client.clone(), Arc::clone(&url), key.clone());
        tasks.push(tokio::spawn(async move {
            // (ok, failed before streaming began, broken after it began)
            let mut counts = (0usize, 0usize, 0usize);
            let mut i = 0;
            while Instant::now() < deadline {
                i += 1;
                let messages = [json!({"role": "user", "content": format!("client {c} request {i}")})];
                let body = json!({"model": "standin-model", "messages": messages, "max_tokens": 16, "stream": true});
                let response = client.request(request(&url, "/v1/chat/completions", key.as_deref(), &body)).await;
                match response {
                    Ok(r) if r.status().is_success() => {
                        let mut b = r.into_body();
                        let mut done = false;
                        let mut broken = false;
                        while let Some(f) = b.frame().await {
                            match f {
                                Ok(f) => {
                                    if let Ok(d) = f.into_data() && d.windows(6).any(|w| w == b"[DONE]") {
                                        done = true;
                                    }
                                }
                                Err(_) => {
                                    broken = true;
                                    break;
                                }
                            }
                        }
                        if done && !broken { counts.0 += 1 } else { counts.2 += 1 }
                    }
                    _ => counts.1 += 1,
                }
            }
            counts
        }));
    }
    let (mut ok, mut before, mut after) = (0, 0, 0);
    for t in tasks {
        let (a, b, c) = t.await.unwrap_or_default();
        ok += a;
        before += b;
        after += c;
    }
    println!("ok={ok} failed_before_streaming={before} broken_after_streaming_began={after}");
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let num = |i: usize| arg(i).parse::<f64>().unwrap_or(0.0);
    let key = |i: usize| Some(arg(i)).filter(|k| k != "-" && !k.is_empty());
    let client = http_client(Duration::from_secs(5));
    match arg(1).as_str() {
        "latency" => latency(client, &arg(2), key(3).as_deref(), num(4), num(5)).await,
        "sessions" => {
            sessions(
                client,
                &arg(2),
                key(3).as_deref(),
                num(4) as usize,
                num(5) as usize,
                num(6) as usize,
                num(7) as usize,
                num(8) as u64,
                Duration::from_millis(num(9) as u64),
            )
            .await;
        }
        "regions" => {
            if let Err(e) = regions(client, &arg(2), &arg(3), num(4) as usize, &arg(5)).await {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
        "budget" => budget(client, &arg(2), &arg(3), num(4) as usize, num(5) as u64).await,
        "failover" => failover(client, &arg(2), key(3).as_deref(), num(4), num(5) as usize).await,
        _ => {
            eprintln!(
                "usage: route_load latency|sessions|regions|budget|failover ... (see the source)"
            );
            std::process::exit(2);
        }
    }
}
