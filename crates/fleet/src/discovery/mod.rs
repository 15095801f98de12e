//! Where upstreams come from besides the configuration's static list.
//!
//! - [`kubernetes`]: the pods of an InferencePool, or the endpoints of a Service, followed
//!   with watches on the Kubernetes API (one list, then a long-lived watch per resource; the
//!   API server is never asked anything per request).

pub mod kubernetes;

pub use self::kubernetes::{
    PoolTarget, SkipReason, endpoint_slice_specs, inference_pool_resource, pod_spec, pool_target,
    spawn_kubernetes_discovery,
};
