//! Endpoint picking: which upstream serves a request.
//!
//! Filters first (healthy, serves the model, in one of the organisation's allowed regions, in
//! the gateway's subset hint, not already tried), then saturation (every eligible upstream
//! saturated: shed with 429), then the weighted scorers of [`Weights`] over the others:
//! prefix-cache affinity, session affinity, waiting queue, KV cache, the router's own
//! requests in flight. Round-robin ignores the scores. Every decision is logged at debug
//! level with its scores.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::{RoutingConfig, Strategy};
use crate::prefix::PrefixIndex;
use crate::upstream::{Pool, Upstream};

/// What a request asks of the picker.
#[derive(Clone, Copy, Debug, Default)]
pub struct PickRequest<'a> {
    /// The model asked for.
    pub model: &'a str,
    /// The prompt's chained block hashes ([`crate::prefix::block_hashes`]).
    pub prefix: &'a [u64],
    /// The request's session, if it names one.
    pub session: Option<&'a str>,
    /// The regions the organisation may be served in (`None`: any).
    pub regions: Option<&'a [String]>,
    /// The gateway's endpoint subset (`host:port`s), if it sent one.
    pub subset: Option<&'a [String]>,
    /// Upstreams already tried for this request.
    pub exclude: &'a [String],
}

/// Why nothing was picked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PickError {
    /// No upstream may serve the request (none healthy, none in its regions, none serves the
    /// model): 503.
    #[error("no replica may serve this request: {reason}")]
    NoneEligible {
        /// Which filter emptied the list.
        reason: &'static str,
    },
    /// Every eligible upstream is saturated: 429, shed.
    #[error("every replica that may serve this request is saturated")]
    Saturated,
}

/// The picker's scores for one upstream (each 0 to 1, before weighting).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Scores {
    /// Leading prompt blocks it holds, as a share of the prompt's blocks.
    pub prefix: f64,
    /// 1 for the session's upstream.
    pub session: f64,
    /// Queue shortness relative to the others.
    pub queue: f64,
    /// Free KV cache.
    pub kv_cache: f64,
    /// In-flight fewness relative to the others.
    pub in_flight: f64,
    /// The weighted sum.
    pub total: f64,
}

/// A decision.
#[derive(Clone, Debug)]
pub struct Pick {
    /// The upstream.
    pub upstream: Arc<Upstream>,
    /// Its scores.
    pub scores: Scores,
    /// Leading prompt blocks it was thought to hold.
    pub prefix_blocks: usize,
}

/// A bounded least-recently-used map of session → upstream name.
#[derive(Debug, Default)]
struct Sessions {
    clock: u64,
    map: HashMap<String, (String, u64)>,
    order: std::collections::BTreeMap<u64, String>,
}

impl Sessions {
    fn get(&self, session: &str) -> Option<&str> {
        self.map.get(session).map(|(u, _)| u.as_str())
    }

    fn put(&mut self, session: &str, upstream: &str, capacity: usize) {
        self.clock += 1;
        let now = self.clock;
        if let Some((_, old)) = self
            .map
            .insert(session.to_owned(), (upstream.to_owned(), now))
        {
            self.order.remove(&old);
        }
        self.order.insert(now, session.to_owned());
        while self.map.len() > capacity {
            match self.order.pop_first() {
                Some((_, oldest)) => {
                    self.map.remove(&oldest);
                }
                None => break,
            }
        }
    }
}

/// The picker: the pool, the prefix index and the session table.
#[derive(Debug)]
pub struct Picker {
    pool: Arc<Pool>,
    config: RoutingConfig,
    prefix: PrefixIndex,
    sessions: Mutex<Sessions>,
    turn: AtomicUsize,
}

impl Picker {
    /// A picker over `pool`.
    pub fn new(pool: Arc<Pool>, config: RoutingConfig) -> Self {
        Picker {
            prefix: PrefixIndex::new(config.prefix_blocks_per_upstream),
            pool,
            config,
            sessions: Mutex::new(Sessions::default()),
            turn: AtomicUsize::new(0),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The routing configuration.
    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }

    /// The prefix index.
    pub fn prefix_index(&self) -> &PrefixIndex {
        &self.prefix
    }

    /// Whether an upstream is saturated.
    pub fn saturated(&self, u: &Upstream) -> bool {
        let load = u.load();
        load.waiting >= self.config.queue_saturation
            || load.kv_usage >= self.config.kv_saturation
            || (self.config.max_in_flight > 0 && u.in_flight() >= self.config.max_in_flight)
    }

    /// Picks an upstream for `req`, or says why none.
    pub fn pick(&self, req: &PickRequest<'_>) -> Result<Pick, PickError> {
        let members = self.pool.snapshot();
        let mut eligible: Vec<&Arc<Upstream>> = members.iter().collect();
        let mut narrow = |keep: &dyn Fn(&Upstream) -> bool, reason: &'static str| {
            eligible.retain(|u| keep(u));
            if eligible.is_empty() {
                Err(PickError::NoneEligible { reason })
            } else {
                Ok(())
            }
        };
        if members.is_empty() {
            return Err(PickError::NoneEligible {
                reason: "the pool is empty",
            });
        }
        narrow(&|u| u.serves(req.model), "none serves this model")?;
        if let Some(regions) = req.regions {
            narrow(
                &|u| regions.iter().any(|r| *r == u.spec().region),
                "none is in the organisation's allowed regions",
            )?;
        }
        if let Some(subset) = req.subset {
            narrow(
                &|u| subset.iter().any(|a| a == u.authority()),
                "none is in the gateway's endpoint subset",
            )?;
        }
        narrow(
            &|u| !req.exclude.iter().any(|x| x == u.name()),
            "every eligible replica failed",
        )?;
        narrow(&|u| u.is_healthy(), "none is healthy")?;
        eligible.retain(|u| !self.saturated(u));
        if eligible.is_empty() {
            return Err(PickError::Saturated);
        }
        // A replica with the model in memory answers now; one that would have to load it
        // first (seconds to minutes) is picked only when none has it loaded.
        if eligible.iter().any(|u| u.has_loaded(req.model)) {
            eligible.retain(|u| u.has_loaded(req.model));
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let matches = if req.prefix.is_empty() {
            HashMap::new()
        } else {
            self.prefix.matches(req.prefix)
        };
        let session_upstream = req.session.and_then(|s| {
            self.sessions
                .lock()
                .ok()
                .and_then(|t| t.get(s).map(str::to_owned))
        });
        let pick_at = |i: usize, scores: Scores| {
            let upstream = Arc::clone(eligible[i]);
            let prefix_blocks = matches.get(upstream.name()).copied().unwrap_or(0);
            Pick {
                upstream,
                scores,
                prefix_blocks,
            }
        };
        if self.config.strategy == Strategy::RoundRobin {
            let i = turn % eligible.len();
            return Ok(pick_at(i, Scores::default()));
        }
        let w = self.config.weights;
        let relative = |values: &[f64]| -> Vec<f64> {
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            values
                .iter()
                .map(|v| {
                    if max > min {
                        1.0 - (v - min) / (max - min)
                    } else {
                        1.0
                    }
                })
                .collect()
        };
        let loads: Vec<_> = eligible.iter().map(|u| u.load()).collect();
        let queue = relative(&loads.iter().map(|l| l.waiting).collect::<Vec<_>>());
        let in_flight = relative(
            &eligible
                .iter()
                .map(|u| u.in_flight() as f64)
                .collect::<Vec<_>>(),
        );
        let blocks = req.prefix.len().max(1) as f64;
        let mut best: Option<(usize, Scores)> = None;
        let n = eligible.len();
        for k in 0..n {
            // Start at a rotating offset so that ties spread over the upstreams.
            let i = (turn + k) % n;
            let u = eligible[i];
            let mut s = Scores {
                prefix: matches.get(u.name()).copied().unwrap_or(0) as f64 / blocks,
                session: f64::from(u8::from(session_upstream.as_deref() == Some(u.name()))),
                queue: queue[i],
                kv_cache: 1.0 - loads[i].kv_usage,
                in_flight: in_flight[i],
                total: 0.0,
            };
            s.total = w.prefix * s.prefix
                + w.session * s.session
                + w.queue * s.queue
                + w.kv_cache * s.kv_cache
                + w.in_flight * s.in_flight;
            tracing::debug!(
                upstream = u.name(),
                total = s.total,
                prefix = s.prefix,
                session = s.session,
                queue = s.queue,
                kv_cache = s.kv_cache,
                in_flight = s.in_flight,
                "score"
            );
            if best.as_ref().is_none_or(|(_, b)| s.total > b.total) {
                best = Some((i, s));
            }
        }
        let (i, scores) = best.ok_or(PickError::Saturated)?;
        let pick = pick_at(i, scores);
        tracing::debug!(
            upstream = pick.upstream.name(),
            total = scores.total,
            prefix_blocks = pick.prefix_blocks,
            candidates = n,
            "picked"
        );
        Ok(pick)
    }

    /// Records where a request went: its prompt blocks and its session now point there.
    pub fn routed(&self, upstream: &Upstream, prefix: &[u64], session: Option<&str>) {
        if !prefix.is_empty() {
            self.prefix.insert(upstream.name(), prefix);
        }
        if let Some(session) = session
            && let Ok(mut t) = self.sessions.lock()
        {
            t.put(session, upstream.name(), self.config.max_sessions);
        }
    }

    /// Forgets upstreams that left the pool.
    pub fn forget_departed(&self) {
        let members = self.pool.snapshot();
        for name in self.prefix.upstreams() {
            if !members.iter().any(|u| u.name() == name) {
                self.prefix.remove(&name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefix::block_hashes;
    use crate::upstream::{EngineKind, Load, UpstreamSpec};

    fn pool(specs: &[(&str, &str)]) -> Arc<Pool> {
        Arc::new(
            Pool::with(
                specs
                    .iter()
                    .enumerate()
                    .map(|(i, (name, region))| UpstreamSpec {
                        name: (*name).into(),
                        url: format!("http://127.0.0.1:{}", 9000 + i),
                        engine: EngineKind::Vllm,
                        region: (*region).into(),
                        models: vec![],
                    })
                    .collect(),
            )
            .unwrap(),
        )
    }

    #[test]
    fn regions_are_a_hard_line() {
        let p = pool(&[("a", "eu-west"), ("b", "eu-north"), ("c", "us-east")]);
        let picker = Picker::new(Arc::clone(&p), RoutingConfig::default());
        let regions = vec!["eu-north".to_owned()];
        for _ in 0..20 {
            let pick = picker
                .pick(&PickRequest {
                    regions: Some(&regions),
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(pick.upstream.name(), "b");
        }
        // Its only replica down: 503, never another region.
        p.get("b").unwrap().set_healthy(false);
        assert_eq!(
            picker
                .pick(&PickRequest {
                    regions: Some(&regions),
                    ..Default::default()
                })
                .unwrap_err(),
            PickError::NoneEligible {
                reason: "none is healthy"
            }
        );
        let nowhere = vec!["ap-south".to_owned()];
        assert!(matches!(
            picker.pick(&PickRequest {
                regions: Some(&nowhere),
                ..Default::default()
            }),
            Err(PickError::NoneEligible { .. })
        ));
    }

    #[test]
    fn replicas_of_several_models_get_only_theirs_and_loaded_ones_first() {
        let p = pool(&[("a", "eu"), ("b", "eu"), ("c", "eu")]);
        let picker = Picker::new(Arc::clone(&p), RoutingConfig::default());
        let text = |loaded: &[(&str, u8)]| {
            let mut t = String::from("# TYPE souverain_model_loaded gauge\n");
            for (m, v) in loaded {
                t.push_str(&format!(
                    "souverain_model_loaded{{model_name=\"{m}\"}} {v}\n"
                ));
            }
            t
        };
        let seen = |page: String| crate::scrape::models_from_metrics(&page).unwrap();
        p.get("a")
            .unwrap()
            .set_models(seen(text(&[("x", 1), ("y", 0)])));
        p.get("b")
            .unwrap()
            .set_models(seen(text(&[("x", 0), ("y", 1)])));
        p.get("c").unwrap().set_models(seen(text(&[("z", 1)])));
        let pick = |model: &str| {
            picker
                .pick(&PickRequest {
                    model,
                    ..Default::default()
                })
                .map(|p| p.upstream.name().to_owned())
        };
        for _ in 0..6 {
            assert_eq!(pick("x").unwrap(), "a");
            assert_eq!(pick("y").unwrap(), "b");
            assert_eq!(pick("z").unwrap(), "c");
        }
        assert!(matches!(pick("w"), Err(PickError::NoneEligible { .. })));
        // Where it is loaded is saturated: a replica that would load it takes the request.
        p.get("a").unwrap().set_load(Load {
            waiting: 1000.0,
            running: 16.0,
            kv_usage: 1.0,
        });
        assert_eq!(pick("x").unwrap(), "b");
        // Label values are unescaped; other series are ignored.
        assert_eq!(
            crate::scrape::models_from_metrics(
                "souverain_model_loaded{model_name=\"q\\\"r\"} 1\nvllm:x{model_name=\"s\"} 1\n"
            ),
            Some(vec![("q\"r".to_owned(), true)])
        );
        assert_eq!(crate::scrape::models_from_metrics("vllm:x 1\n"), None);
    }

    #[test]
    fn prefix_and_session_affinity_win_over_equal_load() {
        let p = pool(&[("a", "eu"), ("b", "eu"), ("c", "eu"), ("d", "eu")]);
        let picker = Picker::new(Arc::clone(&p), RoutingConfig::default());
        let system = vec![b'x'; 4096];
        let hashes = block_hashes(&system, 256);
        let first = picker
            .pick(&PickRequest {
                prefix: &hashes,
                ..Default::default()
            })
            .unwrap();
        picker.routed(&first.upstream, &hashes, Some("s1"));
        for _ in 0..10 {
            let again = picker
                .pick(&PickRequest {
                    prefix: &hashes,
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(again.upstream.name(), first.upstream.name());
            assert_eq!(again.prefix_blocks, hashes.len());
            let by_session = picker
                .pick(&PickRequest {
                    session: Some("s1"),
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(by_session.upstream.name(), first.upstream.name());
        }
        // A long queue outweighs affinity only when the weights say so.
        first.upstream.set_load(Load {
            waiting: 50.0,
            running: 16.0,
            kv_usage: 0.97,
        });
        let moved = picker
            .pick(&PickRequest {
                prefix: &hashes,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(moved.upstream.name(), first.upstream.name());
        let mut config = RoutingConfig::default();
        config.weights.prefix = 0.5;
        let load_first = Picker::new(Arc::clone(&p), config);
        load_first.routed(&first.upstream, &hashes, None);
        let moved = load_first
            .pick(&PickRequest {
                prefix: &hashes,
                ..Default::default()
            })
            .unwrap();
        assert_ne!(moved.upstream.name(), first.upstream.name());
    }

    #[test]
    fn saturation_sheds_and_round_robin_rotates() {
        let p = pool(&[("a", "eu"), ("b", "eu")]);
        let config = RoutingConfig {
            strategy: Strategy::RoundRobin,
            queue_saturation: 4.0,
            ..RoutingConfig::default()
        };
        let picker = Picker::new(Arc::clone(&p), config);
        let names: Vec<String> = (0..4)
            .map(|_| {
                picker
                    .pick(&PickRequest::default())
                    .unwrap()
                    .upstream
                    .name()
                    .to_owned()
            })
            .collect();
        assert_eq!(names, ["a", "b", "a", "b"]);
        let busy = Load {
            waiting: 4.0,
            ..Load::default()
        };
        p.get("a").unwrap().set_load(busy);
        assert_eq!(
            picker
                .pick(&PickRequest::default())
                .unwrap()
                .upstream
                .name(),
            "b"
        );
        p.get("b").unwrap().set_load(busy);
        assert_eq!(
            picker.pick(&PickRequest::default()).unwrap_err(),
            PickError::Saturated
        );
        // Excluded (already tried) and subset filters.
        p.get("a").unwrap().set_load(Load::default());
        let tried = vec!["a".to_owned()];
        assert!(matches!(
            picker.pick(&PickRequest {
                exclude: &tried,
                ..Default::default()
            }),
            Err(PickError::Saturated)
        ));
        let subset = vec!["127.0.0.1:9000".to_owned()];
        assert_eq!(
            picker
                .pick(&PickRequest {
                    subset: Some(&subset),
                    ..Default::default()
                })
                .unwrap()
                .upstream
                .name(),
            "a"
        );
    }
}
