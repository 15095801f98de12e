//! The server's own time in a request, for `souverain bench --profile`: the real `serve`
//! application (the same engine settings, the same two-worker async runtime) on a loopback
//! port, and lone streaming chat requests sent to it one at a time, timed as
//! `scripts/bench/serve-load` times them (from sending the request to the first chunk with
//! content). What a forward pass does not contain (HTTP, the chat template, tokenising, the
//! engine's queue and wake-up, the first chunk's way back) is each request's time to first
//! token less the step its prompt takes by the profile's fit; the engine's prefix-cache
//! counters (`/metrics`) say how many of its prompt tokens that step computed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use engine::{Engine, EngineConfig};
use plan::cpu::CpuFit;
use plan::sim::{StepCost, prompt_attention_k};

/// What serve-load's clients ask about (its prompts have this shape).
const TOPICS: [&str; 8] = [
    "a lighthouse keeper",
    "a mountain village",
    "a river journey",
    "a clockmaker",
    "a winter market",
    "an old library",
    "a ship's cook",
    "a desert town",
];

/// How long the server is left idle before each timed request: as long as serve-load's
/// requests find it idle, its threads parked (they park after ~100 µs of spinning), not
/// straight after another request's last chunk. serve-load sends its first request 1.3 to
/// 4.5 ms after its warm-up's last chunk (measured at 1, 4 and 16 streams on a 2-core Xeon
/// VM). Not longer: on that machine a step after a long idle is slower (the first one-row
/// step 8.4 ms after 100 ms idle, 4.8 ms warm), and the request overhead measured after 2,
/// 10, 50 and 250 ms of idle was 0.5, 0.8, 3.9 and 9.3 ms: the steps' slowing, counted as
/// the server's own time, made one stream's predicted time to first token 59% too long.
const IDLE_BEFORE: Duration = Duration::from_millis(3);

/// Longest response line read (a stream's chunks are far shorter).
const MAX_LINE: usize = 1 << 20;

/// Starts `serve`'s application for `model` with `threads` engine threads, sends one
/// warm-up request and then `requests` lone streaming requests, and returns each request's
/// overhead in seconds (its time to first content less its prompt step by `fit`).
pub(crate) fn measure(
    model: &Path,
    threads: usize,
    requests: usize,
    fit: &CpuFit,
) -> Result<Vec<f64>> {
    let config = EngineConfig {
        threads,
        ..EngineConfig::default()
    };
    let max_batch_tokens = config.max_batch_tokens;
    let engine = Engine::load(model, config, &mut |_, _| {})
        .with_context(|| format!("loading {} for the server", model.display()))?;
    let model_id = engine.model_id().to_string();
    let runtime = crate::serve_runtime()?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .context("binding a loopback port")?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = api::App::new(Arc::new(engine) as Arc<dyn api::Backend>);
    let server = runtime.spawn(app.serve(listener, async {
        let _ = stopped.await;
    }));
    let result: Result<Vec<f64>> = (|| {
        let body = |i: usize| {
            serde_json::json!({
                "model": model_id,
                "messages": [{
                    "role": "user",
                    "content": format!(
                        "Write a long, detailed story about {} (variant {i}).",
                        TOPICS[i % TOPICS.len()]
                    ),
                }],
                "max_tokens": 1,
                "temperature": 0,
                "stream": true,
                "stream_options": {"include_usage": true},
            })
            .to_string()
        };
        // The warm-up puts the chat template's first blocks in the prefix cache, as
        // serve-load's warm-up request does.
        first_content(addr, &body(requests))?;
        let mut overheads = Vec::with_capacity(requests);
        // Requests not timed: no text in the first token; a prompt of several steps.
        let mut untimed = (0, 0);
        for i in 0..requests {
            let before = prefix_counters(addr)?;
            std::thread::sleep(IDLE_BEFORE);
            let seconds = first_content(addr, &body(i))?;
            let after = prefix_counters(addr)?;
            let prompt = after.0.saturating_sub(before.0);
            let computed = prompt.saturating_sub(after.1.saturating_sub(before.1));
            let Some(seconds) = seconds else {
                untimed.0 += 1;
                continue;
            };
            // A prompt longer than a step's tokens takes several steps; these prompts are
            // short, but a template could make them long: such a request is not timed.
            if computed == 0 || computed > max_batch_tokens {
                untimed.1 += 1;
                continue;
            }
            // The sequence's last prompt token costs as a decoding row (it needs logits),
            // as the simulation counts it.
            let step = fit.step_seconds(
                1,
                computed - 1,
                prompt as f64,
                prompt_attention_k((prompt - computed) as f64, (computed - 1) as f64),
            );
            overheads.push(seconds - step);
        }
        if overheads.len() * 2 < requests.max(1) {
            bail!(
                "only {} of {requests} requests to the server could be timed ({} had no text \
                 in their first token, {} prompts took more than one step)",
                overheads.len(),
                untimed.0,
                untimed.1
            );
        }
        Ok(overheads)
    })();
    let _ = stop.send(());
    let _ = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(10), server).await });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Sends one request over a fresh HTTP/1.0 connection (the response is the rest of the
/// stream, no chunked framing) and returns the response's status line and a reader of the
/// rest; `t0` is taken just before the request is written (the connection is already open,
/// as serve-load's clients open theirs first).
fn send(addr: SocketAddr, head: &str, body: &str) -> Result<(Instant, BufReader<TcpStream>)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let request = format!(
        "{head} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let t0 = Instant::now();
    s.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(s);
    let Some(status) = read_line(&mut reader)? else {
        bail!("{head}: the server closed the connection without answering");
    };
    let ok = status.split_whitespace().nth(1) == Some("200");
    // The headers.
    while let Some(line) = read_line(&mut reader)? {
        if line.trim().is_empty() {
            break;
        }
    }
    if !ok {
        let mut body = Vec::new();
        // What of the body comes; the status line is the error either way.
        let _ = reader.by_ref().take(300).read_to_end(&mut body);
        bail!(
            "{head}: {} {}",
            status.trim(),
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok((t0, reader))
}

/// One line of at most [`MAX_LINE`] bytes; `None` at the end of the stream.
fn read_line(r: &mut BufReader<TcpStream>) -> Result<Option<String>> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if n == MAX_LINE && !line.ends_with(b"\n") {
        bail!("a response line longer than {MAX_LINE} bytes");
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// A streaming chat request: seconds from sending it to its first chunk with content, or
/// `None` when no chunk had any (a first token that is not text yet); reads to `[DONE]`.
/// An error event fails it.
fn first_content(addr: SocketAddr, body: &str) -> Result<Option<f64>> {
    let (t0, mut r) = send(addr, "POST /v1/chat/completions", body)?;
    let mut first = None;
    while let Some(line) = read_line(&mut r)? {
        let Some(data) = line.trim().strip_prefix("data:") else {
            continue;
        };
        let data = data.trim();
        if data == "[DONE]" {
            return Ok(first);
        }
        let at = t0.elapsed().as_secs_f64();
        let chunk: serde_json::Value = serde_json::from_str(data).context("a stream chunk")?;
        if let Some(e) = chunk.get("error") {
            bail!("the server's stream failed: {e}");
        }
        if first.is_some() {
            continue;
        }
        let content = chunk["choices"].as_array().is_some_and(|c| {
            c.iter().any(|c| {
                c["delta"]["content"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
            })
        });
        if content {
            first = Some(at);
        }
    }
    bail!("the server's stream ended before [DONE]")
}

/// The engine's prefix-cache counters from `/metrics`: prompt tokens looked up, and found.
fn prefix_counters(addr: SocketAddr) -> Result<(usize, usize)> {
    let (_, r) = send(addr, "GET /metrics", "")?;
    let mut text = String::new();
    r.take(fleet::scrape::MAX_METRICS_BYTES as u64)
        .read_to_string(&mut text)
        .context("reading /metrics")?;
    let samples = fleet::scrape::parse_metrics(&text);
    let value = |name: &str| {
        samples
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.value as usize)
    };
    match (
        value("souverain_prefix_cache_queries_total"),
        value("souverain_prefix_cache_hits_total"),
    ) {
        (Some(q), Some(h)) => Ok((q, h)),
        _ => bail!("/metrics has no prefix-cache counters"),
    }
}
