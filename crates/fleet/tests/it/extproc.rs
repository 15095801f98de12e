//! The endpoint picker as Envoy sees it: a tonic client of `envoy.service.ext_proc.v3`
//! plays the gateway's side against `serve_ext_proc` on a loopback port, over a pool of
//! replicas that are never connected to (the picker only reads the pool's state).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use control::{ControlConfig, ControlPlane, KeyPolicy, SqliteStore};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::service::ext_proc::v3 as ep;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value as PbValue, value::Kind};
use ep::processing_request::Request as In;
use ep::processing_response::Response as Out;
use serde_json::{Value, json};
use souverain_fleet::extproc::{
    DESTINATION_ENDPOINT, DESTINATION_NAMESPACE, EndpointPicker, SERVICE_NAME, SUBSET_HINT_KEY,
    SUBSET_HINT_NAMESPACE, metrics_app, serve_endpoint_picker,
};
use souverain_fleet::{
    EngineKind, FleetError, Load, Picker, Pool, RoutingConfig, UpstreamSpec, serve_ext_proc,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A running endpoint picker.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), FleetError>>,
}

impl Server {
    async fn start(picker: Arc<Picker>, control: Option<Arc<ControlPlane>>) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_ext_proc(listener, picker, control, async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn client(&self) -> ExternalProcessorClient<Channel> {
        ExternalProcessorClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    async fn shut_down(mut self) -> Result<(), FleetError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the server did not stop")
            .unwrap()
    }
}

/// A pool of replicas `(name, region)` at `10.0.0.<i+1>:8000`, and a picker over it.
fn picker(replicas: &[(&str, &str)]) -> Arc<Picker> {
    let specs = replicas
        .iter()
        .enumerate()
        .map(|(i, (name, region))| UpstreamSpec {
            name: (*name).to_owned(),
            url: format!("http://10.0.0.{}:8000", i + 1),
            engine: EngineKind::Vllm,
            region: (*region).to_owned(),
            models: vec![],
        })
        .collect();
    let pool = Arc::new(Pool::with(specs).unwrap());
    Arc::new(Picker::new(pool, RoutingConfig::default()))
}

fn request(request: In) -> ep::ProcessingRequest {
    ep::ProcessingRequest {
        request: Some(request),
        ..Default::default()
    }
}

/// Request headers as Envoy sends them (values in `raw_value`), with an optional subset hint.
fn headers(
    list: &[(&str, &str)],
    end_of_stream: bool,
    subset: Option<&[&str]>,
) -> ep::ProcessingRequest {
    let mut all = vec![(":method", "POST"), (":path", "/v1/chat/completions")];
    all.extend_from_slice(list);
    let mut message = request(In::RequestHeaders(ep::HttpHeaders {
        headers: Some(core::HeaderMap {
            headers: all
                .iter()
                .map(|(k, v)| core::HeaderValue {
                    key: (*k).to_owned(),
                    raw_value: v.as_bytes().to_vec(),
                    ..Default::default()
                })
                .collect(),
        }),
        end_of_stream,
        ..Default::default()
    }));
    if let Some(subset) = subset {
        let list = PbValue {
            kind: Some(Kind::ListValue(ListValue {
                values: subset
                    .iter()
                    .map(|s| PbValue {
                        kind: Some(Kind::StringValue((*s).to_owned())),
                    })
                    .collect(),
            })),
        };
        message.metadata_context = Some(core::Metadata {
            filter_metadata: [(
                SUBSET_HINT_NAMESPACE.to_owned(),
                Struct {
                    fields: [(SUBSET_HINT_KEY.to_owned(), list)].into(),
                },
            )]
            .into(),
            ..Default::default()
        });
    }
    message
}

fn body(bytes: &[u8], end_of_stream: bool) -> ep::ProcessingRequest {
    request(In::RequestBody(ep::HttpBody {
        body: bytes.to_vec(),
        end_of_stream,
        ..Default::default()
    }))
}

/// Sends `messages` on one stream, closes it, and returns every response.
async fn exchange(
    client: &mut ExternalProcessorClient<Channel>,
    messages: Vec<ep::ProcessingRequest>,
) -> Vec<ep::ProcessingResponse> {
    let (tx, rx) = mpsc::channel(messages.len().max(1));
    for m in messages {
        tx.send(m).await.unwrap();
    }
    drop(tx);
    let mut stream = client
        .process(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    let collect = async {
        while let Some(response) = stream.message().await.unwrap() {
            out.push(response);
        }
    };
    tokio::time::timeout(Duration::from_secs(20), collect)
        .await
        .expect("the stream did not end");
    out
}

/// A chat request's body, with a system prompt and a user message.
fn chat(system: &str, user: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "model": "m",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user}
        ]
    }))
    .unwrap()
}

/// Places a chat request (body in two chunks) and returns the picked endpoint, checking the
/// whole protocol on the way.
async fn place(
    client: &mut ExternalProcessorClient<Channel>,
    header_list: &[(&str, &str)],
    subset: Option<&[&str]>,
    payload: &[u8],
) -> String {
    let half = payload.len() / 2;
    let responses = exchange(
        client,
        vec![
            headers(header_list, false, subset),
            body(&payload[..half], false),
            body(&payload[half..], true),
        ],
    )
    .await;
    let endpoint = destination(&responses);
    let echoed = streamed_body(&responses[1..]);
    assert_eq!(echoed, payload, "the body must come back unchanged");
    endpoint
}

/// The endpoint a headers response names, checking the header and the metadata agree.
fn destination(responses: &[ep::ProcessingResponse]) -> String {
    let first = responses.first().expect("no response");
    let Some(Out::RequestHeaders(h)) = &first.response else {
        panic!("expected a request-headers response, got {first:?}");
    };
    let common = h.response.as_ref().unwrap();
    assert!(common.clear_route_cache);
    let set = &common.header_mutation.as_ref().unwrap().set_headers;
    let header = set
        .iter()
        .filter_map(|o| o.header.as_ref())
        .find(|h| h.key == DESTINATION_ENDPOINT)
        .expect("no destination header");
    let endpoint = String::from_utf8(header.raw_value.clone()).unwrap();
    let metadata = first
        .dynamic_metadata
        .as_ref()
        .expect("no dynamic metadata");
    let Some(Kind::StructValue(namespace)) = &metadata.fields[DESTINATION_NAMESPACE].kind else {
        panic!("no envoy.lb namespace");
    };
    assert_eq!(
        namespace.fields[DESTINATION_ENDPOINT].kind,
        Some(Kind::StringValue(endpoint.clone())),
        "header and metadata must agree"
    );
    endpoint
}

/// The body streamed back, checking only the last chunk ends the stream.
fn streamed_body(responses: &[ep::ProcessingResponse]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ended = false;
    for r in responses {
        let Some(Out::RequestBody(b)) = &r.response else {
            continue;
        };
        assert!(!ended, "body after end_of_stream");
        let mutation = b
            .response
            .as_ref()
            .and_then(|c| c.body_mutation.as_ref())
            .and_then(|m| m.mutation.as_ref());
        let Some(ep::body_mutation::Mutation::StreamedResponse(s)) = mutation else {
            panic!("expected a streamed body mutation, got {r:?}");
        };
        out.extend_from_slice(&s.body);
        ended = s.end_of_stream;
    }
    assert!(ended, "the body never ended");
    out
}

/// The status and JSON body of an immediate response.
fn immediate(responses: &[ep::ProcessingResponse]) -> (i32, Value) {
    let last = responses.last().expect("no response");
    let Some(Out::ImmediateResponse(i)) = &last.response else {
        panic!("expected an immediate response, got {last:?}");
    };
    let body: Value = serde_json::from_slice(&i.body).unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert!(body["error"]["type"].is_string());
    (i.status.as_ref().unwrap().code, body)
}

fn authorities(picker: &Picker) -> Vec<String> {
    picker
        .pool()
        .snapshot()
        .iter()
        .map(|u| u.authority().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_request_is_placed_and_its_body_passed_back() {
    let picker = picker(&[("a", "eu-west"), ("b", "eu-west"), ("c", "eu-west")]);
    let server = Server::start(Arc::clone(&picker), None).await;
    let mut client = server.client().await;
    let payload = chat("You are terse.", "hello");
    let half = payload.len() / 2;
    let responses = exchange(
        &mut client,
        vec![
            headers(&[("content-type", "application/json")], false, None),
            body(&payload[..half], false),
            body(&payload[half..], true),
            request(In::ResponseHeaders(ep::HttpHeaders::default())),
            request(In::ResponseBody(ep::HttpBody {
                body: b"data: {}".to_vec(),
                end_of_stream: true,
                ..Default::default()
            })),
            request(In::ResponseTrailers(ep::HttpTrailers::default())),
        ],
    )
    .await;
    let endpoint = destination(&responses);
    assert!(authorities(&picker).contains(&endpoint), "{endpoint}");
    let Some(Out::RequestHeaders(h)) = &responses[0].response else {
        unreachable!()
    };
    let content_length = h
        .response
        .as_ref()
        .unwrap()
        .header_mutation
        .as_ref()
        .unwrap()
        .set_headers
        .iter()
        .filter_map(|o| o.header.as_ref())
        .find(|h| h.key == "content-length")
        .map(|h| h.raw_value.clone());
    assert_eq!(content_length, Some(payload.len().to_string().into_bytes()));
    assert_eq!(streamed_body(&responses), payload);
    // The response phases pass through untouched.
    let tail: Vec<_> = responses.iter().rev().take(3).rev().collect();
    assert!(matches!(&tail[0].response, Some(Out::ResponseHeaders(h))
        if h.response.as_ref().is_some_and(|c| c.header_mutation.is_none() && c.body_mutation.is_none())));
    assert!(matches!(&tail[1].response, Some(Out::ResponseBody(b))
        if b.response.as_ref().is_some_and(|c| c.body_mutation.is_none())));
    assert!(
        matches!(&tail[2].response, Some(Out::ResponseTrailers(t)) if t.header_mutation.is_none())
    );

    // A large body comes back whole, in several chunks.
    let big = chat(&"x".repeat(300_000), "hi");
    let endpoint = place(&mut client, &[], None, &big).await;
    assert!(authorities(&picker).contains(&endpoint));

    // A request without a body is placed from its headers at once.
    let responses = exchange(&mut client, vec![headers(&[], true, None)]).await;
    assert_eq!(responses.len(), 1);
    assert!(authorities(&picker).contains(&destination(&responses)));
    drop(client);
    server.shut_down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subset_hint_bounds_the_choice() {
    let picker = picker(&[("a", "eu"), ("b", "eu"), ("c", "eu"), ("d", "eu")]);
    let server = Server::start(Arc::clone(&picker), None).await;
    let mut client = server.client().await;
    let subset = ["10.0.0.2:8000", "10.0.0.4:8000"];
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..20 {
        let endpoint = place(
            &mut client,
            &[],
            Some(&subset),
            &chat("s", &format!("q{i}")),
        )
        .await;
        assert!(
            subset.contains(&endpoint.as_str()),
            "{endpoint} is outside the subset"
        );
        seen.insert(endpoint);
    }
    assert!(!seen.is_empty());
    // A subset naming no member, or an empty one: 503.
    for subset in [&["10.9.9.9:1"][..], &[][..]] {
        let responses = exchange(
            &mut client,
            vec![
                headers(&[], false, Some(subset)),
                body(&chat("s", "q"), true),
            ],
        )
        .await;
        let (status, error) = immediate(&responses);
        assert_eq!(status, 503, "{error}");
    }
    drop(client);
    server.shut_down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_eligible_is_503_and_all_saturated_is_429() {
    let picker = picker(&[("a", "eu"), ("b", "eu")]);
    let server = Server::start(Arc::clone(&picker), None).await;
    let mut client = server.client().await;
    let members = picker.pool().snapshot();
    let busy = Load {
        waiting: picker.config().queue_saturation,
        ..Load::default()
    };
    for u in members.iter() {
        u.set_load(busy);
    }
    let responses = exchange(
        &mut client,
        vec![headers(&[], false, None), body(&chat("s", "q"), true)],
    )
    .await;
    let (status, error) = immediate(&responses);
    assert_eq!(status, 429);
    assert_eq!(error["error"]["code"], "server_overloaded");
    // One freed: placed there.
    members[1].set_load(Load::default());
    assert_eq!(
        place(&mut client, &[], None, &chat("s", "q")).await,
        members[1].authority()
    );
    for u in members.iter() {
        u.set_healthy(false);
    }
    let responses = exchange(
        &mut client,
        vec![headers(&[], false, None), body(&chat("s", "q"), true)],
    )
    .await;
    let (status, error) = immediate(&responses);
    assert_eq!(status, 503);
    assert_eq!(error["error"]["type"], "server_error");
    // Without a body too.
    let responses = exchange(&mut client, vec![headers(&[], true, None)]).await;
    assert_eq!(immediate(&responses).0, 503);
    drop(client);
    server.shut_down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_are_refused() {
    let picker = picker(&[("a", "eu")]);
    let server = Server::start(Arc::clone(&picker), None).await;
    let mut client = server.client().await;
    for bad in [&b"{\"model\": "[..], b"[1, 2]", b"\xff\xfe"] {
        let responses = exchange(
            &mut client,
            vec![headers(&[], false, None), body(bad, true)],
        )
        .await;
        let (status, error) = immediate(&responses);
        assert_eq!(status, 400);
        assert_eq!(error["error"]["type"], "invalid_request_error");
        assert_eq!(error["error"]["code"], "invalid_json");
    }
    // Over the body bound (16 MiB): 413 before the body ends.
    let chunk = vec![b' '; 1 << 20];
    let mut messages = vec![headers(&[], false, None)];
    messages.extend((0..17).map(|_| body(&chunk, false)));
    messages.push(body(b"{}", true));
    let responses = exchange(&mut client, messages).await;
    assert_eq!(responses.len(), 1);
    assert_eq!(immediate(&responses).0, 413);
    // The server still serves.
    assert_eq!(
        place(&mut client, &[], None, &chat("s", "q")).await,
        "10.0.0.1:8000"
    );
    drop(client);
    server.shut_down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sharing_a_long_system_prompt_go_to_the_same_replica() {
    let picker = picker(&[("a", "eu"), ("b", "eu"), ("c", "eu"), ("d", "eu")]);
    let server = Server::start(Arc::clone(&picker), None).await;
    let mut client = server.client().await;
    let mut firsts = Vec::new();
    for agent in 0..4 {
        let system = format!("You are agent {agent}. ").repeat(200);
        let first = place(&mut client, &[], None, &chat(&system, "first question")).await;
        let second = place(
            &mut client,
            &[],
            None,
            &chat(&system, "another, longer question"),
        )
        .await;
        assert_eq!(first, second, "agent {agent}");
        firsts.push(first);
    }
    // Different prompts spread (ties rotate over equally loaded replicas).
    firsts.sort();
    firsts.dedup();
    assert!(firsts.len() > 1, "{firsts:?}");
    drop(client);
    server.shut_down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_organisation_is_served_only_in_its_regions() {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let control = Arc::new(ControlPlane::new(
        store,
        ControlConfig::new("eu-west", b"test-secret".to_vec()),
    ));
    let org = control
        .create_org("test", "acme", Some(vec!["eu-north".to_owned()]))
        .unwrap();
    let project = control.create_project("test", &org.id, "p", None).unwrap();
    let key = control
        .create_key("test", &project.id, "k", KeyPolicy::default())
        .unwrap();
    let only_m = control
        .create_key(
            "test",
            &project.id,
            "only-m",
            KeyPolicy {
                allowed_models: vec!["m".to_owned()],
                ..KeyPolicy::default()
            },
        )
        .unwrap();
    let picker = picker(&[
        ("paris", "eu-west"),
        ("stockholm", "eu-north"),
        ("virginia", "us-east"),
    ]);
    let server = Server::start(Arc::clone(&picker), Some(Arc::clone(&control))).await;
    let mut client = server.client().await;
    let bearer = format!("Bearer {}", key.plaintext);
    for i in 0..20 {
        let endpoint = place(
            &mut client,
            &[("authorization", &bearer)],
            None,
            &chat("s", &format!("q{i}")),
        )
        .await;
        assert_eq!(endpoint, "10.0.0.2:8000");
    }
    // No key, a malformed one, an unknown one: 401.
    let wrong = format!("Bearer {}x", key.plaintext);
    for auth in [
        None,
        Some("Basic abc"),
        Some("Bearer sk-sov-nope"),
        Some(wrong.as_str()),
    ] {
        let list: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let responses = exchange(
            &mut client,
            vec![headers(&list, false, None), body(&chat("s", "q"), true)],
        )
        .await;
        let (status, error) = immediate(&responses);
        assert_eq!(status, 401, "{auth:?}: {error}");
    }
    // A key limited to model `m` asking for another: 403.
    let other_model = serde_json::to_vec(&json!({"model": "n", "prompt": "hi"})).unwrap();
    let limited = format!("Bearer {}", only_m.plaintext);
    let responses = exchange(
        &mut client,
        vec![
            headers(&[("authorization", &limited)], false, None),
            body(&other_model, true),
        ],
    )
    .await;
    let (status, error) = immediate(&responses);
    assert_eq!(status, 403, "{error}");
    assert_eq!(error["error"]["code"], "model_not_allowed");
    // The region's only replica down: 503, never another region.
    picker.pool().get("stockholm").unwrap().set_healthy(false);
    for _ in 0..5 {
        let responses = exchange(
            &mut client,
            vec![
                headers(&[("authorization", &bearer)], false, None),
                body(&chat("s", "q"), true),
            ],
        )
        .await;
        assert_eq!(immediate(&responses).0, 503);
    }
    drop(client);
    server.shut_down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_pool() {
    let picker = picker(&[("a", "eu"), ("b", "eu")]);
    let server = Server::start(Arc::clone(&picker), None).await;
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let mut check = async |service: &str| {
        health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    };
    let serving = ServingStatus::Serving as i32;
    let not_serving = ServingStatus::NotServing as i32;
    for service in ["", SERVICE_NAME, "readiness", "liveness"] {
        assert_eq!(check(service).await, serving, "{service:?}");
    }
    let members = picker.pool().snapshot();
    members[0].set_healthy(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(check("").await, serving, "one healthy member is enough");
    members[1].set_healthy(false);
    let mut became = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if check("").await == not_serving {
            became = true;
            break;
        }
    }
    assert!(became, "never NOT_SERVING");
    assert_eq!(check(SERVICE_NAME).await, not_serving);
    assert_eq!(check("readiness").await, not_serving);
    assert_eq!(check("liveness").await, serving);
    members[0].set_healthy(true);
    let mut back = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if check(SERVICE_NAME).await == serving {
            back = true;
            break;
        }
    }
    assert!(back, "never SERVING again");
    drop(health);
    server.shut_down().await.unwrap();
}

/// The picker's `/metrics` page.
async fn metrics_page(app: &axum::Router) -> (u16, String) {
    use tower::ServiceExt;
    let response = app
        .clone()
        .oneshot(
            axum::http::Request::get("/metrics")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status().as_u16();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_count_every_answer_and_each_upstreams_placements() {
    let picker = picker(&[("a", "eu"), ("b", "eu")]);
    let service = EndpointPicker::new(Arc::clone(&picker), None);
    let app = metrics_app(&service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_endpoint_picker(listener, service, async {
        let _ = stopped.await;
    }));
    let mut client = ExternalProcessorClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut placed = Vec::new();
    for i in 0..3 {
        placed.push(place(&mut client, &[], None, &chat("s", &format!("q{i}"))).await);
    }
    // 400, 503 (an empty subset), 429 (all saturated).
    let bad = exchange(
        &mut client,
        vec![headers(&[], false, None), body(b"[1]", true)],
    )
    .await;
    assert_eq!(immediate(&bad).0, 400);
    let none = exchange(
        &mut client,
        vec![headers(&[], false, Some(&[])), body(&chat("s", "q"), true)],
    )
    .await;
    assert_eq!(immediate(&none).0, 503);
    let members = picker.pool().snapshot();
    for u in members.iter() {
        u.set_load(Load {
            waiting: picker.config().queue_saturation,
            ..Load::default()
        });
    }
    let shed = exchange(
        &mut client,
        vec![headers(&[], false, None), body(&chat("s", "q"), true)],
    )
    .await;
    assert_eq!(immediate(&shed).0, 429);

    let (status, page) = metrics_page(&app).await;
    assert_eq!(status, 200);
    for (outcome, count) in [
        ("placed", 3),
        ("shed", 1),
        ("unavailable", 1),
        ("refused", 0),
        ("invalid", 1),
    ] {
        let line = format!("souverain_picker_requests_total{{outcome=\"{outcome}\"}} {count}\n");
        assert!(page.contains(&line), "{line} not in\n{page}");
    }
    assert!(page.contains("# TYPE souverain_picker_upstream_routed_total counter"));
    for u in members.iter() {
        let on = placed.iter().filter(|e| *e == u.authority()).count();
        let labels = format!(
            "{{upstream=\"{}\",region=\"eu\",engine=\"vllm\"}}",
            u.name()
        );
        for line in [
            format!("souverain_picker_upstream_routed_total{labels} {on}\n"),
            format!("souverain_picker_upstream_healthy{labels} 1\n"),
            format!(
                "souverain_picker_upstream_waiting{labels} {}\n",
                picker.config().queue_saturation
            ),
        ] {
            assert!(page.contains(&line), "{line} not in\n{page}");
        }
    }
    drop(client);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the server did not stop")
        .unwrap()
        .unwrap();
}
