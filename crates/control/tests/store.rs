//! One suite, two backends: every test here runs against SQLite (a fresh file) and against
//! PostgreSQL (a fresh schema in the database named by `SOUVERAIN_TEST_DATABASE_URL`). Without
//! that variable the PostgreSQL half is skipped with a note, unless
//! `SOUVERAIN_REQUIRE_POSTGRES=1`, which makes a missing database a failure (CI sets both).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use souverain_control::audit::entry_hash;
use souverain_control::store::latest_schema_version;
use souverain_control::{
    AuditDraft, Budget, BudgetPeriod, ControlConfig, ControlError, ControlPlane, Denial,
    EnergySource, EnergyUse, GroupBy, HOLDER_TIMEOUT, Holder, KeyContext, KeyPolicy,
    MAX_STORED_FIELD_CHARS, MAX_STORED_RESPONSE_BYTES, ManualClock, Outcome, PostgresStore,
    SqliteStore, Store, StoreError, Tamper, UsageFilter, usage,
};

const REGION: &str = "eu-west-paris";
const START_MS: i64 = 1_780_000_000_000;

/// A fresh store of one backend, with raw SQL access for tampering.
struct Fixture {
    backend: &'static str,
    path: Option<PathBuf>,
    pg: Option<(String, String)>,
    store: Arc<dyn Store>,
}

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn sqlite_fixture() -> Fixture {
    let dir = std::env::temp_dir().join(unique("souverain_control_test"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("control.db");
    let store = SqliteStore::open(&path).unwrap();
    Fixture {
        backend: "sqlite",
        path: Some(path),
        pg: None,
        store: Arc::new(store),
    }
}

fn postgres_fixture() -> Option<Fixture> {
    let url = testkit::database_url()?;
    let schema = unique("t").to_lowercase();
    let store = PostgresStore::connect_in_schema(&url, Some(&schema)).unwrap();
    Some(Fixture {
        backend: "postgres",
        path: None,
        pg: Some((url, schema)),
        store: Arc::new(store),
    })
}

impl Fixture {
    /// A second, independent connection to the same database (another process's view).
    fn reopen(&self) -> Arc<dyn Store> {
        match (&self.path, &self.pg) {
            (Some(path), _) => Arc::new(SqliteStore::open(path).unwrap()),
            (_, Some((url, schema))) => {
                Arc::new(PostgresStore::connect_in_schema(url, Some(schema)).unwrap())
            }
            _ => unreachable!(),
        }
    }

    /// Runs SQL straight on the database, as someone with write access could.
    fn exec(&self, sql: &str) {
        match (&self.path, &self.pg) {
            (Some(path), _) => {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.execute_batch(sql).unwrap();
            }
            (_, Some((url, schema))) => {
                let mut config: ::postgres::Config = url.parse().unwrap();
                config.options(&format!("-c search_path={schema}"));
                let mut client = config.connect(::postgres::NoTls).unwrap();
                client.batch_execute(sql).unwrap();
            }
            _ => unreachable!(),
        }
    }

    fn plane(&self) -> (ControlPlane, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(START_MS));
        let config = ControlConfig::new(REGION, b"test server secret".to_vec());
        let plane = ControlPlane::new(Arc::clone(&self.store), config).with_clock(clock.clone());
        (plane, clock)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(path) = &self.path
            && let Some(dir) = path.parent()
        {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some((_, schema)) = &self.pg
            && !std::thread::panicking()
        {
            self.exec(&format!("DROP SCHEMA {schema} CASCADE"));
        }
    }
}

/// An org, project and key with `policy`; returns the key's context and plaintext.
fn tenant(plane: &ControlPlane, policy: KeyPolicy, retention: Option<i64>) -> (KeyContext, String) {
    let org = plane.create_org("admin", "Acme", None).unwrap();
    let project = plane
        .create_project("admin", &org.id, "chatbot", retention)
        .unwrap();
    let key = plane
        .create_key("admin", &project.id, "prod", policy)
        .unwrap();
    let ctx = plane.authenticate(&key.plaintext).unwrap();
    (ctx, key.plaintext)
}

fn outcome(id: &str, prompt: u64, completion: u64) -> Outcome {
    Outcome {
        request_id: id.to_owned(),
        model: "m".to_owned(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        reasoning_tokens: 0,
        ttft_us: Some(100),
        duration_us: 1_000,
        status: "ok".to_owned(),
        http_status: 200,
        content: Some(("the prompt".to_owned(), "the output".to_owned())),
        energy: None,
    }
}

fn denial(err: ControlError) -> Denial {
    match err {
        ControlError::Denied(d) => d,
        other => panic!("expected a denial, got {other:?}"),
    }
}

// ---- the suite ------------------------------------------------------------------------------

fn migrations_apply_once_and_data_survives_reopening(fx: &Fixture) {
    assert_eq!(fx.store.schema_version().unwrap(), latest_schema_version());
    let (plane, _) = fx.plane();
    let org = plane.create_org("admin", "Acme", None).unwrap();
    let again = fx.reopen();
    assert_eq!(again.schema_version().unwrap(), latest_schema_version());
    assert_eq!(again.get_org(&org.id).unwrap(), Some(org));
    again.ping().unwrap();
    assert_eq!(again.backend_name(), fx.backend);
}

fn keys_authenticate_until_revoked_or_expired(fx: &Fixture) {
    let (plane, clock) = fx.plane();
    let policy = KeyPolicy {
        expires_at_ms: Some(START_MS + 60_000),
        allowed_models: vec!["m".into()],
        ..KeyPolicy::default()
    };
    let (ctx, plaintext) = tenant(&plane, policy, None);
    assert_eq!(ctx.key.policy.allowed_models, vec!["m".to_owned()]);
    assert!(plane.check_model(&ctx, "m").is_ok());
    assert_eq!(
        plane.check_model(&ctx, "other"),
        Err(Denial::ModelNotAllowed {
            model: "other".into()
        })
    );
    // The store holds a salted hash, never the key or its secret.
    let listed = plane.list_keys(&ctx.project.id).unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!plaintext.contains(&listed[0].hash_hex));
    assert!(!listed[0].hash_hex.contains(&plaintext[19..]));
    let json = serde_json::to_string(&listed[0]).unwrap();
    assert!(
        !json.contains(&listed[0].hash_hex),
        "hashes are not serialised: {json}"
    );

    // A wrong secret with a real id, an unknown id, a malformed key.
    let mut wrong = plaintext.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'a' { 'b' } else { 'a' });
    assert_eq!(
        denial(plane.authenticate(&wrong).unwrap_err()),
        Denial::UnknownKey
    );
    let unknown = format!("sk-sov-{}", "Z".repeat(52));
    assert_eq!(
        denial(plane.authenticate(&unknown).unwrap_err()),
        Denial::UnknownKey
    );
    assert!(matches!(
        denial(plane.authenticate("sk-sov-short").unwrap_err()),
        Denial::MalformedKey { .. }
    ));

    clock.advance_ms(60_000);
    assert_eq!(
        denial(plane.authenticate(&plaintext).unwrap_err()),
        Denial::ExpiredKey
    );

    let (ctx2, plaintext2) = tenant(&plane, KeyPolicy::default(), None);
    plane.revoke_key("admin", &ctx2.key.id).unwrap();
    plane.revoke_key("admin", &ctx2.key.id).unwrap();
    assert_eq!(
        denial(plane.authenticate(&plaintext2).unwrap_err()),
        Denial::RevokedKey
    );
    // Revocation is seen by another connection (another server process) at once.
    let (_, other_plane) = {
        let config = ControlConfig::new(REGION, b"test server secret".to_vec());
        ((), ControlPlane::new(fx.reopen(), config))
    };
    assert_eq!(
        denial(other_plane.authenticate(&plaintext2).unwrap_err()),
        Denial::RevokedKey
    );

    // Every failure above is in the audit log, and the chain is intact.
    let entries = plane.audit_entries().unwrap();
    let failures = entries
        .iter()
        .filter(|e| e.action == "auth.failure")
        .count();
    assert_eq!(failures, 6, "{entries:#?}");
    assert!(entries.iter().any(|e| e.action == "key.revoke"));
    assert!(plane.verify_audit().unwrap().is_intact());
}

fn bad_admin_input_is_refused(fx: &Fixture) {
    let (plane, _) = fx.plane();
    let err = plane
        .create_project("admin", "org_missing", "p", None)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ControlError::Store(StoreError::NotFound {
                kind: "organization",
                ..
            })
        ),
        "{err:?}"
    );
    let org = plane.create_org("admin", "Acme", None).unwrap();
    assert_eq!(org.allowed_regions, vec![REGION.to_owned()]);
    for (name, regions) in [("", None), ("ok", Some(vec!["EU West".to_owned()]))] {
        assert!(matches!(
            plane.create_org("admin", name, regions).unwrap_err(),
            ControlError::Invalid { .. }
        ));
    }
    assert!(matches!(
        plane
            .create_project("admin", &org.id, "p", Some(0))
            .unwrap_err(),
        ControlError::Invalid {
            field: "retention_secs",
            ..
        }
    ));
    let project = plane.create_project("admin", &org.id, "p", None).unwrap();
    let zero_rpm = KeyPolicy {
        requests_per_minute: Some(0),
        ..KeyPolicy::default()
    };
    assert!(matches!(
        plane
            .create_key("admin", &project.id, "k", zero_rpm)
            .unwrap_err(),
        ControlError::Invalid {
            field: "requests_per_minute",
            ..
        }
    ));
    let past = KeyPolicy {
        expires_at_ms: Some(START_MS - 1),
        ..KeyPolicy::default()
    };
    assert!(plane.create_key("admin", &project.id, "k", past).is_err());
    assert!(
        plane
            .create_key("admin", "proj_missing", "k", KeyPolicy::default())
            .is_err()
    );
    assert!(matches!(
        plane.revoke_key("admin", "nokey").unwrap_err(),
        ControlError::Store(StoreError::NotFound { kind: "key", .. })
    ));
    assert!(
        plane
            .set_org_regions("admin", "org_missing", vec![])
            .is_err()
    );
    // Nothing refused left a trace in the audit log.
    let actions: Vec<String> = plane
        .audit_entries()
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(actions, vec!["org.create", "project.create"]);
}

fn residency_follows_the_organisation(fx: &Fixture) {
    let (plane, _) = fx.plane();
    let org = plane
        .create_org("admin", "Acme US", Some(vec!["us-east-virginia".into()]))
        .unwrap();
    let project = plane.create_project("admin", &org.id, "p", None).unwrap();
    let key = plane
        .create_key("admin", &project.id, "k", KeyPolicy::default())
        .unwrap();
    let ctx = plane.authenticate(&key.plaintext).unwrap();
    assert_eq!(
        plane.check_region(&ctx),
        Err(Denial::RegionNotAllowed {
            region: REGION.into()
        })
    );
    let updated = plane
        .set_org_regions(
            "admin",
            &org.id,
            vec!["us-east-virginia".into(), REGION.into()],
        )
        .unwrap();
    assert_eq!(updated.allowed_regions.len(), 2);
    let ctx = plane.authenticate(&key.plaintext).unwrap();
    assert!(plane.check_region(&ctx).is_ok());
}

fn budget_reservations_are_exact_under_concurrency(fx: &Fixture) {
    let (plane, clock) = fx.plane();
    let policy = KeyPolicy {
        budget: Some(Budget {
            tokens: 1_000,
            period: BudgetPeriod::Hour,
        }),
        ..KeyPolicy::default()
    };
    let (ctx, _) = tenant(&plane, policy, None);
    let plane = Arc::new(plane);
    let ctx = Arc::new(ctx);
    let barrier = Arc::new(Barrier::new(64));
    let threads: Vec<_> = (0..64)
        .map(|_| {
            let (plane, ctx, barrier) = (plane.clone(), ctx.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                plane.reserve(&ctx, 40, 60)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let granted: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(granted.len(), 10, "exactly 1000 / 100 reservations fit");
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        match refused {
            ControlError::Denied(Denial::QuotaExceeded {
                requested,
                remaining,
                retry_after_secs,
            }) => {
                assert_eq!((*requested, *remaining), (100, 0));
                assert!(retry_after_secs.is_some_and(|s| s > 0 && s <= 3600));
            }
            other => panic!("{other:?}"),
        }
    }
    let period = BudgetPeriod::Hour.start_ms(START_MS);
    assert_eq!(fx.store.budget_used(&ctx.key.id, period).unwrap(), 1_000);
    // Settling gives back what was not used.
    for (i, r) in granted.iter().enumerate() {
        plane
            .settle(&ctx, Some(r), outcome(&format!("req-{i}"), 40, 20))
            .unwrap();
    }
    assert_eq!(fx.store.budget_used(&ctx.key.id, period).unwrap(), 600);
    assert!(plane.reserve(&ctx, 300, 100).is_ok());
    assert!(plane.reserve(&ctx, 0, 1).is_err());
    // A new hour brings a new budget.
    clock.advance_ms(3_600_000);
    assert!(plane.reserve(&ctx, 500, 500).is_ok());
}

fn settlements_record_usage_content_and_audit(fx: &Fixture) {
    let (plane, clock) = fx.plane();
    let (keeper, _) = tenant(&plane, KeyPolicy::default(), Some(60));
    let (forgetter, _) = tenant(&plane, KeyPolicy::default(), None);
    let mut metered = outcome("a", 3, 4);
    metered.energy = Some(EnergyUse {
        microjoules: 1_234_567,
        source: EnergySource::Modelled,
    });
    plane.settle(&keeper, None, metered).unwrap();
    clock.advance_ms(1_000);
    plane.settle(&forgetter, None, outcome("b", 5, 6)).unwrap();
    let mut failed = outcome("c", 1, 0);
    failed.status = "failed".into();
    failed.http_status = 500;
    plane.settle(&keeper, None, failed).unwrap();

    let all = plane.usage(&UsageFilter::default()).unwrap();
    assert_eq!(
        all.iter().map(|u| u.id.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert_eq!(all[0].org_id, keeper.org.id);
    assert_eq!(all[0].ttft_us, Some(100));
    // Energy survives the store (migration 4) with its label; unmetered requests have none.
    assert_eq!(all[0].energy_uj, Some(1_234_567));
    assert_eq!(all[0].energy_source, Some(EnergySource::Modelled));
    assert_eq!((all[1].energy_uj, all[1].energy_source), (None, None));
    let keeper_only = plane
        .usage(&UsageFilter {
            key_id: Some(keeper.key.id.clone()),
            ..UsageFilter::default()
        })
        .unwrap();
    assert_eq!(keeper_only.len(), 2);
    let later = plane
        .usage(&UsageFilter {
            from_ms: Some(START_MS + 1),
            ..UsageFilter::default()
        })
        .unwrap();
    assert_eq!(later.len(), 2);
    let by_org = usage::aggregate(&all, &[GroupBy::Org, GroupBy::Status]);
    assert_eq!(by_org.len(), 3);
    let total: i64 = by_org.iter().map(|g| g.total_tokens).sum();
    assert_eq!(total, 19);
    assert_eq!(usage::records_csv(&all).lines().count(), 4);

    // Zero retention by default; the opted-in project keeps content until its time is up.
    assert!(
        fx.store
            .retained_content(&forgetter.project.id)
            .unwrap()
            .is_empty()
    );
    let kept = fx.store.retained_content(&keeper.project.id).unwrap();
    assert_eq!(kept.len(), 2);
    assert_eq!(kept[0].prompt, "the prompt");
    assert_eq!(plane.enforce_retention().unwrap(), 0);
    clock.advance_ms(59_500);
    assert_eq!(
        plane.enforce_retention().unwrap(),
        1,
        "the first one is 60.5 s old"
    );
    clock.advance_ms(1_000);
    assert_eq!(plane.enforce_retention().unwrap(), 1);
    assert!(
        fx.store
            .retained_content(&keeper.project.id)
            .unwrap()
            .is_empty()
    );

    let uses = plane
        .audit_entries()
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "key.use")
        .count();
    assert_eq!(uses, 3);
    assert!(plane.verify_audit().unwrap().is_intact());
}

fn batch_objects_are_owned_listed_replaced_and_expire(fx: &Fixture) {
    use souverain_control::{Mutation, ObjectAudit, ObjectFilter, ObjectKind, StoredObject};
    let (plane, clock) = fx.plane();
    let (owner, _) = tenant(&plane, KeyPolicy::default(), None);
    let (stranger, _) = tenant(&plane, KeyPolicy::default(), None);
    let object =
        |kind, id: &str, parent: Option<&str>, status: Option<&str>, at: i64| StoredObject {
            kind,
            id: id.to_owned(),
            project_id: owner.project.id.clone(),
            parent: parent.map(str::to_owned),
            status: status.map(str::to_owned),
            created_at_ms: START_MS + at,
            expires_at_ms: None,
            meta: format!(r#"{{"id":"{id}"}}"#),
            content: Some(format!("content of {id}")),
        };
    let put = |o: StoredObject| Mutation::PutObject(o);
    plane
        .commit_objects(
            vec![
                put(object(ObjectKind::File, "file-a", None, None, 0)),
                put(object(
                    ObjectKind::Batch,
                    "batch_a",
                    None,
                    Some("in_progress"),
                    1,
                )),
                put(object(
                    ObjectKind::Batch,
                    "batch_b",
                    None,
                    Some("completed"),
                    2,
                )),
                put(object(
                    ObjectKind::Result,
                    "batch_a:00000001",
                    Some("batch_a"),
                    None,
                    3,
                )),
                put(object(
                    ObjectKind::Result,
                    "batch_a:00000000",
                    Some("batch_a"),
                    None,
                    4,
                )),
            ],
            Some(ObjectAudit {
                key_id: &owner.key.id,
                action: "batch.create",
                target: "batch_a",
                detail: serde_json::json!({}),
            }),
        )
        .unwrap();
    // Owned: another project sees nothing; the runner (no project) sees it.
    let got = plane
        .get_object(ObjectKind::File, "file-a", Some(&owner.project.id))
        .unwrap()
        .unwrap();
    assert_eq!(got.content.as_deref(), Some("content of file-a"));
    assert_eq!(
        plane
            .get_object(ObjectKind::File, "file-a", Some(&stranger.project.id))
            .unwrap(),
        None
    );
    assert!(
        plane
            .get_object(ObjectKind::Batch, "batch_a", None)
            .unwrap()
            .is_some()
    );
    assert_eq!(
        plane.get_object(ObjectKind::Batch, "file-a", None).unwrap(),
        None
    );
    // Lists: by status across projects, by parent, newest first with a cursor.
    let filter = |kind| ObjectFilter {
        kind,
        project_id: None,
        parent: None,
        statuses: Vec::new(),
        after_id: None,
        newest_first: false,
        limit: 100,
        with_content: true,
    };
    let running = plane
        .list_objects(&ObjectFilter {
            statuses: vec!["in_progress".into(), "cancelling".into()],
            ..filter(ObjectKind::Batch)
        })
        .unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].id, "batch_a");
    let results = plane
        .list_objects(&ObjectFilter {
            parent: Some("batch_a".into()),
            ..filter(ObjectKind::Result)
        })
        .unwrap();
    assert_eq!(results.len(), 2);
    let newest = plane
        .list_objects(&ObjectFilter {
            project_id: Some(owner.project.id.clone()),
            newest_first: true,
            limit: 1,
            ..filter(ObjectKind::Batch)
        })
        .unwrap();
    assert_eq!(newest[0].id, "batch_b");
    let next = plane
        .list_objects(&ObjectFilter {
            project_id: Some(owner.project.id.clone()),
            newest_first: true,
            after_id: Some("batch_b".into()),
            ..filter(ObjectKind::Batch)
        })
        .unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].id, "batch_a");
    // Replaced in place; results deleted together; a stranger cannot delete.
    let mut done = object(ObjectKind::Batch, "batch_a", None, Some("completed"), 1);
    done.expires_at_ms = Some(START_MS + 10_000);
    plane
        .commit_objects(
            vec![
                put(done),
                Mutation::DeleteResults {
                    batch_id: "batch_a".into(),
                },
            ],
            None,
        )
        .unwrap();
    let got = plane
        .get_object(ObjectKind::Batch, "batch_a", None)
        .unwrap()
        .unwrap();
    assert_eq!(got.status.as_deref(), Some("completed"));
    assert!(
        plane
            .list_objects(&ObjectFilter {
                parent: Some("batch_a".into()),
                ..filter(ObjectKind::Result)
            })
            .unwrap()
            .is_empty()
    );
    let delete = |project: &str| Mutation::DeleteObject {
        kind: ObjectKind::File,
        id: "file-a".into(),
        project_id: project.to_owned(),
    };
    assert!(
        plane
            .commit_objects(vec![delete(&stranger.project.id)], None)
            .is_err()
    );
    plane
        .commit_objects(vec![delete(&owner.project.id)], None)
        .unwrap();
    // Only object changes go through here.
    assert!(
        plane
            .commit_objects(
                vec![Mutation::HolderSeen {
                    holder: "h".into(),
                    seen_ms: 0
                }],
                None
            )
            .is_err()
    );
    // Expiry: gone to readers at once, from the store at the retention pass.
    clock.advance_ms(11_000);
    assert_eq!(
        plane
            .get_object(ObjectKind::Batch, "batch_a", None)
            .unwrap(),
        None
    );
    assert_eq!(plane.enforce_retention().unwrap(), 1);
    assert!(
        plane
            .get_object(ObjectKind::Batch, "batch_b", None)
            .unwrap()
            .is_some()
    );
    assert!(
        plane
            .audit_entries()
            .unwrap()
            .iter()
            .any(|e| e.action == "batch.create" && e.target == "batch_a")
    );
}

fn stored_responses_are_owned_bounded_and_expire(fx: &Fixture) {
    let (plane, clock) = fx.plane();
    let (keeper, _) = tenant(&plane, KeyPolicy::default(), Some(60));
    let (forgetter, _) = tenant(&plane, KeyPolicy::default(), None);
    // Another project of the keeper's organisation, and another organisation's.
    let sibling_project = plane
        .create_project("admin", &keeper.org.id, "other", Some(60))
        .unwrap();
    let sibling_key = plane
        .create_key("admin", &sibling_project.id, "k", KeyPolicy::default())
        .unwrap();
    let sibling = plane.authenticate(&sibling_key.plaintext).unwrap();
    let (stranger, _) = tenant(&plane, KeyPolicy::default(), Some(60));

    let input = r#"[{"role":"user","content":"hi"}]"#.to_owned();
    let body = r#"{"id":"resp_a","object":"response"}"#.to_owned();
    let stored = plane
        .store_response(&keeper, "resp_a", input.clone(), body.clone())
        .unwrap();
    assert_eq!(stored.expires_at_ms, START_MS + 60_000);
    let got = plane.get_response(&keeper, "resp_a").unwrap().unwrap();
    assert_eq!(
        (got.input.as_str(), got.response.as_str()),
        (input.as_str(), body.as_str())
    );
    assert_eq!(got.org_id, keeper.org.id);
    // Owned by its project: neither another project nor another organisation sees it or can
    // delete it.
    for other in [&sibling, &stranger] {
        assert_eq!(plane.get_response(other, "resp_a").unwrap(), None);
        assert!(!plane.delete_response(other, "resp_a").unwrap());
    }
    assert!(plane.get_response(&keeper, "resp_a").unwrap().is_some());
    assert_eq!(
        plane.get_response(&keeper, &"x".repeat(100_000)).unwrap(),
        None
    );

    // Zero retention keeps nothing; bad ids and oversized rows are refused.
    let refused = plane
        .store_response(&forgetter, "resp_b", input.clone(), body.clone())
        .unwrap_err();
    assert!(
        matches!(refused, ControlError::Invalid { field: "store", .. }),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("zero retention"), "{refused}");
    assert!(
        plane
            .store_response(&keeper, "resp b'", input.clone(), body.clone())
            .is_err()
    );
    let huge = "x".repeat(MAX_STORED_RESPONSE_BYTES);
    let too_big = plane
        .store_response(&keeper, "resp_c", input.clone(), huge)
        .unwrap_err();
    assert!(
        matches!(too_big, ControlError::Invalid { field: "store", .. }),
        "{too_big:?}"
    );
    assert_eq!(plane.get_response(&keeper, "resp_c").unwrap(), None);

    // Deleting: once, audited.
    plane
        .store_response(&keeper, "resp_d", input.clone(), body.clone())
        .unwrap();
    assert!(plane.delete_response(&keeper, "resp_d").unwrap());
    assert!(!plane.delete_response(&keeper, "resp_d").unwrap());
    assert_eq!(plane.get_response(&keeper, "resp_d").unwrap(), None);
    let actions: Vec<String> = plane
        .audit_entries()
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .filter(|a| a.starts_with("response."))
        .collect();
    assert_eq!(
        actions,
        ["response.store", "response.store", "response.delete"]
    );

    // Retention: unreadable once its time is up, deleted by the retention pass.
    clock.advance_ms(59_999);
    assert!(plane.get_response(&keeper, "resp_a").unwrap().is_some());
    assert_eq!(plane.enforce_retention().unwrap(), 0);
    clock.advance_ms(1);
    assert_eq!(plane.get_response(&keeper, "resp_a").unwrap(), None);
    assert_eq!(plane.enforce_retention().unwrap(), 1);
    assert_eq!(
        fx.store
            .get_response("resp_a", &keeper.project.id, 0)
            .unwrap(),
        None,
        "the row itself is gone"
    );
    assert!(plane.verify_audit().unwrap().is_intact());
}

fn stored_request_strings_are_bounded(fx: &Fixture) {
    let (plane, _) = fx.plane();
    let (ctx, _) = tenant(&plane, KeyPolicy::default(), None);
    // A client's 3 MB model name (multi-byte characters, to cut on a boundary).
    let mut huge = outcome("big", 1, 0);
    huge.model = "é".repeat(1_500_000);
    huge.status = "x".repeat(10_000);
    plane.settle(&ctx, None, huge).unwrap();
    let usage = plane.usage(&UsageFilter::default()).unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].model, "é".repeat(MAX_STORED_FIELD_CHARS));
    assert_eq!(usage[0].status.len(), MAX_STORED_FIELD_CHARS);
    let entry = plane.audit_entries().unwrap().pop().unwrap();
    assert_eq!(entry.action, "key.use");
    assert!(
        entry.detail.len() < 4 * MAX_STORED_FIELD_CHARS,
        "{}",
        entry.detail.len()
    );
    assert!(plane.verify_audit().unwrap().is_intact());
}

fn rate_limits_count_requests_and_tokens(fx: &Fixture) {
    let (plane, _) = fx.plane();
    let policy = KeyPolicy {
        requests_per_minute: Some(2),
        tokens_per_minute: Some(100),
        ..KeyPolicy::default()
    };
    let (ctx, _) = tenant(&plane, policy, None);
    assert!(plane.check_request_rate(&ctx).is_ok());
    assert!(plane.check_request_rate(&ctx).is_ok());
    match plane.check_request_rate(&ctx) {
        Err(Denial::RateLimited {
            retry_after_secs, ..
        }) => assert!((1..=30).contains(&retry_after_secs)),
        other => panic!("{other:?}"),
    }
    let r = plane.reserve(&ctx, 30, 50).unwrap();
    assert!(matches!(
        denial(plane.reserve(&ctx, 10, 20).unwrap_err()),
        Denial::RateLimited { .. }
    ));
    // Settling for less than reserved gives the difference back to the bucket.
    plane.settle(&ctx, Some(&r), outcome("r", 30, 0)).unwrap();
    assert!(plane.reserve(&ctx, 10, 20).is_ok());
}

fn concurrent_appends_from_two_connections_keep_the_chain(fx: &Fixture) {
    let stores = [Arc::clone(&fx.store), fx.reopen()];
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let store = Arc::clone(&stores[t % 2]);
            std::thread::spawn(move || {
                for i in 0..8 {
                    let draft = AuditDraft {
                        at_ms: i,
                        actor: format!("thread{t}"),
                        action: "test.append".into(),
                        target: String::new(),
                        detail: "{}".into(),
                    };
                    store.commit(&[], Some(&draft)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (plane, _) = fx.plane();
    let report = plane.verify_audit().unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(report.entries, 128);
    assert_eq!(report.head_seq, 128);
}

/// Six entries, then `sql` run on the table, then verify.
fn tampered(fx: &Fixture, sql: &dyn Fn(&Fixture) -> String) -> Vec<Tamper> {
    let (plane, _) = fx.plane();
    for i in 0..6 {
        plane
            .create_org("admin", &format!("org {i}"), None)
            .unwrap();
    }
    assert!(plane.verify_audit().unwrap().is_intact());
    fx.exec(&sql(fx));
    plane.verify_audit().unwrap().problems
}

fn audit_verify_names_an_edit(fx: &Fixture) {
    let problems = tampered(fx, &|_| {
        "UPDATE audit_log SET detail = '{\"name\":\"someone else\"}' WHERE seq = 3".into()
    });
    assert_eq!(problems, vec![Tamper::Edited { seq: 3 }]);
}

fn audit_verify_names_a_deletion(fx: &Fixture) {
    let problems = tampered(fx, &|_| "DELETE FROM audit_log WHERE seq = 3".into());
    assert_eq!(
        problems,
        vec![Tamper::Deleted {
            after_seq: 2,
            before_seq: Some(4),
            missing: 1
        }]
    );
    let problems = tampered(&fresh(fx), &|_| {
        "DELETE FROM audit_log WHERE seq >= 5".into()
    });
    assert_eq!(
        problems,
        vec![Tamper::Deleted {
            after_seq: 4,
            before_seq: None,
            missing: 2
        }]
    );
}

fn audit_verify_names_an_insertion(fx: &Fixture) {
    let problems = tampered(fx, &|fx| {
        // A forged entry with a correct hash, chained after #2, the rest renumbered.
        let prev = fx.store.audit_entries().unwrap()[1].hash.clone();
        let forged = AuditDraft {
            at_ms: START_MS,
            actor: "admin".into(),
            action: "key.create".into(),
            target: "backdoor".into(),
            detail: "{}".into(),
        };
        let hash = entry_hash(&prev, &forged);
        format!(
            "UPDATE audit_log SET seq = seq + 1000 WHERE seq >= 3;
             UPDATE audit_log SET seq = seq - 999 WHERE seq >= 1003;
             INSERT INTO audit_log (seq, at_ms, actor, action, target, detail, prev_hash, hash)
             VALUES (3, {START_MS}, 'admin', 'key.create', 'backdoor', '{{}}', '{prev}', '{hash}');"
        )
    });
    assert_eq!(problems, vec![Tamper::Inserted { seq: 3 }]);
}

fn audit_verify_names_a_reordering(fx: &Fixture) {
    let problems = tampered(fx, &|_| {
        "UPDATE audit_log SET seq = -1 WHERE seq = 3;
         UPDATE audit_log SET seq = 3 WHERE seq = 4;
         UPDATE audit_log SET seq = 4 WHERE seq = -1;"
            .into()
    });
    assert_eq!(
        problems,
        vec![Tamper::Reordered {
            seq: 3,
            should_follow_seq: 4
        }]
    );
}

/// Another fresh fixture of the same backend.
/// A control plane over the fixture's store with the fast path's settings.
fn hot_plane(
    fx: &Fixture,
    key_cache: Duration,
    lease: u64,
) -> (Arc<ControlPlane>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(START_MS));
    let mut config = ControlConfig::new(REGION, b"test server secret".to_vec());
    config.key_cache_ttl = key_cache;
    config.budget_lease_tokens = lease;
    let plane = ControlPlane::new(Arc::clone(&fx.store), config).with_clock(clock.clone());
    (Arc::new(plane), clock)
}

fn cached_keys_are_checked_and_forgotten(fx: &Fixture) {
    let (plane, clock) = hot_plane(fx, Duration::from_secs(60), 0);
    let policy = KeyPolicy {
        expires_at_ms: Some(START_MS + 10_000),
        ..KeyPolicy::default()
    };
    let (ctx, plaintext) = tenant(&plane, policy, None);
    // `tenant` authenticated once: the key is cached, and each use checks the secret.
    let cached = plane
        .cached_key(&plaintext)
        .expect("cached after authenticate");
    assert_eq!(cached.key.id, ctx.key.id);
    let mut forged = plaintext.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'a' { 'b' } else { 'a' });
    assert!(plane.cached_key(&forged).is_none());
    assert!(plane.cached_key("sk-sov-nonsense").is_none());
    // Expiry is checked on every use, cached or not.
    clock.advance_ms(10_000);
    assert!(plane.cached_key(&plaintext).is_none());
    clock.advance_ms(-10_000);
    assert!(plane.cached_key(&plaintext).is_some());
    // A revocation through this plane empties the cache at once.
    plane.revoke_key("admin", &ctx.key.id).unwrap();
    assert!(plane.cached_key(&plaintext).is_none());
    assert!(plane.authenticate(&plaintext).is_err());

    // Through another process (another plane on the same store): seen once the entry ages.
    let (other, _) = hot_plane(fx, Duration::ZERO, 0);
    let (short, short_clock) = hot_plane(fx, Duration::from_millis(50), 0);
    let (ctx2, plaintext2) = tenant(&short, KeyPolicy::default(), None);
    assert!(short.cached_key(&plaintext2).is_some());
    other.revoke_key("admin", &ctx2.key.id).unwrap();
    short_clock.advance_ms(49);
    assert!(
        short.cached_key(&plaintext2).is_some(),
        "within the time to live"
    );
    short_clock.advance_ms(1);
    assert!(short.cached_key(&plaintext2).is_none());
    assert!(short.authenticate(&plaintext2).is_err());
    // Without a cache, nothing is ever answered from memory.
    let (ctx3, plaintext3) = tenant(&other, KeyPolicy::default(), None);
    assert!(other.authenticate(&plaintext3).is_ok());
    assert!(other.cached_key(&plaintext3).is_none());
    drop(ctx3);
}

fn leased_budgets_are_never_overspent(fx: &Fixture) {
    // Two processes (two planes) share one key's budget, each holding leases.
    let (a, clock) = hot_plane(fx, Duration::ZERO, 100);
    let (b, _) = hot_plane(fx, Duration::ZERO, 100);
    let policy = KeyPolicy {
        budget: Some(Budget {
            tokens: 1_000,
            period: BudgetPeriod::Hour,
        }),
        ..KeyPolicy::default()
    };
    let (ctx, _) = tenant(&a, policy, None);
    let ctx = Arc::new(ctx);
    let period = BudgetPeriod::Hour.start_ms(START_MS);
    let barrier = Arc::new(Barrier::new(64));
    let threads: Vec<_> = (0..64)
        .map(|i| {
            let plane = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (ctx, barrier) = (ctx.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let r = plane.reserve(&ctx, 40, 60);
                (i, r)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let granted: Vec<_> = results
        .iter()
        .filter_map(|(i, r)| r.as_ref().ok().map(|r| (*i, r.clone())))
        .collect();
    // Never more than the budget; at most two leases (62 tokens each: a sixteenth of the
    // budget) are held back from the requests.
    assert!(granted.len() <= 10, "{} granted", granted.len());
    assert!(granted.len() >= 8, "{} granted", granted.len());
    assert!(granted.iter().all(|(_, r)| r.leased));
    let used = fx.store.budget_used(&ctx.key.id, period).unwrap();
    assert!(used <= 1_000, "{used}");
    for (_, r) in results.iter().filter(|(_, r)| r.is_err()) {
        assert!(matches!(
            r,
            Err(ControlError::Denied(Denial::QuotaExceeded { .. }))
        ));
    }
    // Settled through the writer: unused tokens go back to the lease, then to the store.
    for (n, (i, r)) in granted.iter().enumerate() {
        let plane = if i % 2 == 0 { &a } else { &b };
        plane.settle_later(&ctx, Some(r), outcome(&format!("req-{n}"), 40, 20));
    }
    assert!(a.close(Duration::from_secs(10)));
    assert!(b.close(Duration::from_secs(10)));
    let settled = i64::try_from(granted.len() * 60).unwrap();
    assert_eq!(fx.store.budget_used(&ctx.key.id, period).unwrap(), settled);
    let usage = a.usage(&UsageFilter::default()).unwrap();
    assert_eq!(usage.len(), granted.len());

    // A lease serves small requests from memory: the store moves only when it is topped up.
    let first = a.reserve(&ctx, 10, 0).unwrap();
    let after_first = fx.store.budget_used(&ctx.key.id, period).unwrap();
    assert_eq!(after_first, settled + 10 + 62);
    for _ in 0..6 {
        let r = a.try_reserve(&ctx, 10, 0).expect("from the lease").unwrap();
        assert!(r.leased);
    }
    assert_eq!(
        fx.store.budget_used(&ctx.key.id, period).unwrap(),
        after_first
    );
    // Short of the lease, `try_reserve` does not wait on the store.
    assert!(a.try_reserve(&ctx, 100, 0).is_none());
    a.settle_later(&ctx, Some(&first), outcome("req-small", 10, 0));
    assert!(a.close(Duration::from_secs(10)));
    assert_eq!(
        fx.store.budget_used(&ctx.key.id, period).unwrap(),
        settled + 10 + 60
    );
    // A new period starts a new lease; the old one's tokens go back to their period.
    clock.advance_ms(3_600_000);
    assert!(a.reserve(&ctx, 500, 400).is_ok());
    assert!(a.flush_writes(Duration::from_secs(10)));
    assert!(a.verify_audit().unwrap().is_intact());
}

/// Tokens of a key's usage records, and of its budget counter in the period.
fn recorded_and_counted(fx: &Fixture, plane: &ControlPlane, ctx: &KeyContext) -> (i64, i64) {
    let filter = UsageFilter {
        key_id: Some(ctx.key.id.clone()),
        ..UsageFilter::default()
    };
    let recorded = plane
        .usage(&filter)
        .unwrap()
        .iter()
        .map(|u| u.prompt_tokens + u.completion_tokens)
        .sum();
    let period = BudgetPeriod::Hour.start_ms(START_MS);
    (recorded, fx.store.budget_used(&ctx.key.id, period).unwrap())
}

fn a_dead_processs_reservations_are_released(fx: &Fixture) {
    // Process A (budget leases on) reserves for seven requests; three end and are settled,
    // four are in flight when A stops being heard from (killed).
    let (a, _) = hot_plane(fx, Duration::ZERO, 100);
    let policy = KeyPolicy {
        budget: Some(Budget {
            tokens: 100_000,
            period: BudgetPeriod::Hour,
        }),
        ..KeyPolicy::default()
    };
    let (ctx, _) = tenant(&a, policy, None);
    let reserved: Vec<_> = (0..7).map(|_| a.reserve(&ctx, 40, 60).unwrap()).collect();
    for (n, r) in reserved[..3].iter().enumerate() {
        a.settle(&ctx, Some(r), outcome(&format!("a-{n}"), 40, 25))
            .unwrap();
    }
    // Process B (no leases) has one request in flight.
    let (b, b_clock) = hot_plane(fx, Duration::ZERO, 0);
    let in_flight_b = b.reserve(&ctx, 40, 60).unwrap();
    let (recorded, counted) = recorded_and_counted(fx, &b, &ctx);
    assert_eq!(recorded, 3 * 65);
    assert!(counted > recorded + 4 * 100 + 100, "{counted} {recorded}");

    // A was seen a moment ago and its process (this one) runs: B leaves it alone.
    assert_eq!(b.keep_alive().unwrap(), 0);
    assert_eq!(recorded_and_counted(fx, &b, &ctx).1, counted);
    // Past the timeout without a word from A, B gives back all A held: the four requests
    // in flight and A's lease. Only B's own request stays reserved.
    b_clock.advance_ms(i64::try_from(HOLDER_TIMEOUT.as_millis()).unwrap() + 1_000);
    let released = b.keep_alive().unwrap();
    assert_eq!(i64::try_from(released).unwrap(), counted - recorded - 100);
    assert_eq!(
        recorded_and_counted(fx, &b, &ctx),
        (recorded, recorded + 100)
    );
    b.settle(&ctx, Some(&in_flight_b), outcome("b-0", 40, 10))
        .unwrap();
    let (recorded, counted) = recorded_and_counted(fx, &b, &ctx);
    assert_eq!(counted, recorded);
    // Nothing more to release; the release is in the audit log.
    assert_eq!(b.keep_alive().unwrap(), 0);
    let releases: Vec<_> = b
        .audit_entries()
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "budget.release")
        .collect();
    assert_eq!(releases.len(), 1);
    assert_eq!(releases[0].target, format!("holder:{}", a.holder().id));

    // A was only cut off and comes back: it learns its holds were released (its lease's
    // tokens are no longer its to hand out) and its late settlements are not given back twice.
    assert_eq!(a.keep_alive().unwrap(), 0);
    a.settle(&ctx, Some(&reserved[3]), outcome("a-late", 40, 30))
        .unwrap();
    let (recorded, counted) = recorded_and_counted(fx, &b, &ctx);
    assert_eq!(counted, recorded);
    // Its next request reserves afresh in the store rather than from the dropped lease.
    assert!(a.try_reserve(&ctx, 10, 0).is_none());

    // A holder on this host whose process is gone is dead at once, seen or not.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let gone_pid = i64::from(child.id());
    child.wait().unwrap();
    let ghost = Holder {
        id: "ghost".to_owned(),
        host: b.holder().host.clone(),
        pid: gone_pid,
        started_at_ms: START_MS,
    };
    let period = BudgetPeriod::Hour.start_ms(START_MS);
    let now = b.now_ms();
    assert!(
        fx.store
            .reserve_budget(&ghost, now, &ctx.key.id, period, 100_000, 77)
            .unwrap()
            .is_ok()
    );
    assert_eq!(recorded_and_counted(fx, &b, &ctx).1, counted + 77);
    assert_eq!(b.keep_alive().unwrap(), 77);
    assert_eq!(recorded_and_counted(fx, &b, &ctx).1, counted);
    assert!(b.verify_audit().unwrap().is_intact());
}

fn queued_settlements_are_committed_in_groups(fx: &Fixture) {
    let (plane, _) = hot_plane(fx, Duration::from_secs(60), 0);
    let (ctx, _) = tenant(&plane, KeyPolicy::default(), Some(3600));
    let ctx = Arc::new(ctx);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (plane, ctx) = (plane.clone(), ctx.clone());
            std::thread::spawn(move || {
                for i in 0..100 {
                    plane.settle_later(&ctx, None, outcome(&format!("req-{t}-{i}"), 3, 4));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(plane.flush_writes(Duration::from_secs(20)));
    assert_eq!(plane.backlog_len(), 0);
    let usage = plane.usage(&UsageFilter::default()).unwrap();
    assert_eq!(usage.len(), 400);
    assert!(
        usage
            .iter()
            .all(|u| u.prompt_tokens == 3 && u.completion_tokens == 4)
    );
    let entries = plane.audit_entries().unwrap();
    assert_eq!(
        entries.iter().filter(|e| e.action == "key.use").count(),
        400
    );
    assert!(plane.verify_audit().unwrap().is_intact());
}

fn fresh(fx: &Fixture) -> Fixture {
    match fx.backend {
        "sqlite" => sqlite_fixture(),
        _ => postgres_fixture().unwrap(),
    }
}

macro_rules! store_suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    super::$name(&super::sqlite_fixture());
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    if let Some(fx) = super::postgres_fixture() {
                        super::$name(&fx);
                    }
                }
            )*
        }
    };
}

store_suite!(
    migrations_apply_once_and_data_survives_reopening,
    keys_authenticate_until_revoked_or_expired,
    bad_admin_input_is_refused,
    residency_follows_the_organisation,
    budget_reservations_are_exact_under_concurrency,
    settlements_record_usage_content_and_audit,
    stored_responses_are_owned_bounded_and_expire,
    batch_objects_are_owned_listed_replaced_and_expire,
    stored_request_strings_are_bounded,
    rate_limits_count_requests_and_tokens,
    concurrent_appends_from_two_connections_keep_the_chain,
    audit_verify_names_an_edit,
    audit_verify_names_a_deletion,
    audit_verify_names_an_insertion,
    audit_verify_names_a_reordering,
    cached_keys_are_checked_and_forgotten,
    leased_budgets_are_never_overspent,
    a_dead_processs_reservations_are_released,
    queued_settlements_are_committed_in_groups,
);

// ---- PostgreSQL going away ------------------------------------------------------------------

/// A TCP relay to the database that the test can cut and restore: cutting closes every
/// relayed connection and refuses new ones, as a server that went away would.
struct Relay {
    port: u16,
    down: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(upstream: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (down2, open2) = (down.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if down2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let mut open = open2.lock().unwrap();
                open.push(client.try_clone().unwrap());
                open.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Relay { port, down, open }
    }

    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

#[test]
fn postgres_outage_is_unavailable_then_recovers() {
    let Some(url) = testkit::database_url() else {
        return;
    };
    let config: ::postgres::Config = url.parse().unwrap();
    let host = match config.get_hosts().first() {
        Some(::postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let relay = Relay::start(format!("{host}:{port}"));
    let user = config.get_user().unwrap_or("postgres");
    let db = config.get_dbname().unwrap_or("postgres");
    let relayed = format!("postgres://{user}@127.0.0.1:{}/{db}", relay.port);
    let schema = unique("t").to_lowercase();
    let store = Arc::new(PostgresStore::connect_in_schema(&relayed, Some(&schema)).unwrap());
    let plane = ControlPlane::new(store.clone(), ControlConfig::new(REGION, b"s".to_vec()));
    let (ctx, plaintext) = tenant(&plane, KeyPolicy::default(), None);

    relay.cut();
    let started = Instant::now();
    let err = plane.authenticate(&plaintext).unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    let err = plane
        .settle(&ctx, None, outcome("during-outage", 1, 1))
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(plane.backlog_len(), 1, "the usage record waits in memory");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no hang: {:?}",
        started.elapsed()
    );

    relay.restore();
    assert_eq!(plane.authenticate(&plaintext).unwrap().key.id, ctx.key.id);
    plane
        .settle(&ctx, None, outcome("after-outage", 1, 1))
        .unwrap();
    assert_eq!(plane.backlog_len(), 0);
    let ids: Vec<String> = plane
        .usage(&UsageFilter::default())
        .unwrap()
        .into_iter()
        .map(|u| u.id)
        .collect();
    assert_eq!(
        ids.len(),
        2,
        "the queued record was written when the database came back"
    );
    assert!(ids.contains(&"during-outage".to_owned()));
    assert!(plane.verify_audit().unwrap().is_intact());
    drop(plane);
    drop(store);
    let mut direct: ::postgres::Config = url.parse().unwrap();
    direct.options(&format!("-c search_path={schema}"));
    let _ = direct
        .connect(::postgres::NoTls)
        .and_then(|mut c| c.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")));
}

// ---- SQLite's write-ahead log under steady writes --------------------------------------------

/// Commits without a pause for three seconds: the write-ahead log must stay within a few MiB
/// (its limit is 1 MiB), not grow for as long as writes go on. A passive checkpoint alone never
/// reaches the end of a log that is always being written, so the log never restarts; on a
/// volume that fills up that log then holds the space a checkpoint needs, and the store stays
/// unable to write even after space is freed (tests/faults, `sqlite-full`, found it).
#[test]
fn sqlite_write_ahead_log_stays_bounded_under_steady_writes() {
    let fx = sqlite_fixture();
    let (plane, _) = fx.plane();
    let (ctx, _) = tenant(&plane, KeyPolicy::default(), Some(3600));
    let mut wal = fx.path.clone().unwrap().into_os_string();
    wal.push("-wal");
    let wal = std::path::PathBuf::from(wal);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                plane
                    .settle(&ctx, None, outcome(&format!("req-{n}"), 3, 4))
                    .unwrap();
                n += 1;
            }
            n
        })
    };
    let started = std::time::Instant::now();
    let mut largest = 0;
    while started.elapsed() < Duration::from_secs(3) {
        largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let commits = writer.join().unwrap();
    eprintln!(
        "{commits} commits; the log was at most {} KiB",
        largest >> 10
    );
    assert!(commits > 100, "only {commits} commits");
    assert!(
        largest <= 16 << 20,
        "the write-ahead log grew to {} KiB under {commits} commits",
        largest >> 10
    );
}
