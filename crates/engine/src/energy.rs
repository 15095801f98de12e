//! Energy per request: a meter read around every step, its joules split across the step's
//! sequences by a cost model, and the energy between steps kept apart as idle.
//!
//! Sources, chosen once at start ([`EnergyConfig::source`]) and named in logs and `/metrics`:
//! - `rapl`: Linux powercap (`/sys/class/powercap/intel-rapl:N/energy_uj`, package domains;
//!   AMD's packages appear there too), **measured**. Present only when every package counter is
//!   readable (since 2020 kernels make them root-only by default). The counters wrap at
//!   `max_energy_range_uj`; a reading below the last one is taken as one wrap, and the meter is
//!   read at least once a second while the engine idles, well within a wrap (a 262 kJ range
//!   lasts over 40 minutes at 100 W).
//! - `nvml`: NVIDIA's `nvmlDeviceGetTotalEnergyConsumption` (millijoules since the driver
//!   loaded, summed over the GPUs), **measured**. `libnvidia-ml.so.1` is opened at run time, so
//!   nothing is needed to build; without the library or a GPU the source is simply absent.
//! - `model`: a power model of the CPU, **modelled**: `idle_watts` always, plus
//!   `active_watts_per_thread` for each worker thread while a step computes. The defaults are
//!   rough figures for a current server CPU: 5 W per busy thread is a package's TDP over its
//!   cores (AMD EPYC 9654: 360 W / 96 = 3.75 W; Intel Xeon Platinum 8480+: 350 W / 56 =
//!   6.25 W), 10 W idle is a package at rest. Measure your machine and set them
//!   (`--energy-idle-watts`, `--energy-active-watts`).
//!
//! `auto` takes RAPL when it is readable, else the model. It does not take NVML: this engine
//! computes on the CPU, and a GPU's counter would meter work that is not ours.
//!
//! One meter per process ([`EnergyAccount`]): a server's engines (each chat model's, and the
//! embedding model's) read the same account, since a meter measures (or models) the machine,
//! not one engine; the energy between two readings goes to the steps of every engine open
//! during it, split by their worker threads, so the machine is counted once.
//!
//! Attribution. The meter is read when a step starts (what came since the last reading is
//! idle when no step was open: waiting for requests, admission, bookkeeping between steps) and
//! when it ends (forward pass and sampling: the step's energy). A step's energy, in integer microjoules, is split
//! across its chunks in proportion to their [`CostModel`] weight, remainders to the largest
//! fractions, so the parts sum exactly to the step's energy: over any interval, the requests'
//! microjoules (of every engine) plus idle equal the meter's total.

use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

pub use crate::metrics::EnergyKind;
use crate::metrics::{EnergySnapshot, Metrics};

/// Which energy source to use, as `--energy-source` names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EnergySourceChoice {
    /// RAPL when readable, else the model.
    #[default]
    Auto,
    /// Linux powercap RAPL; an error when it is absent or unreadable.
    Rapl,
    /// NVIDIA NVML; an error when the library or a GPU is absent.
    Nvml,
    /// The CPU power model.
    Model,
}

impl FromStr for EnergySourceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "rapl" => Ok(Self::Rapl),
            "nvml" => Ok(Self::Nvml),
            "model" => Ok(Self::Model),
            other => Err(format!(
                "unknown energy source {other:?}: expected auto, rapl, nvml or model"
            )),
        }
    }
}

/// How energy is metered.
#[derive(Clone, Debug, PartialEq)]
pub struct EnergyConfig {
    /// The source.
    pub source: EnergySourceChoice,
    /// The model's package power at rest, watts.
    pub idle_watts: f64,
    /// The model's power per worker thread while a step computes, watts.
    pub active_watts_per_thread: f64,
}

impl Default for EnergyConfig {
    fn default() -> Self {
        Self {
            source: EnergySourceChoice::Auto,
            idle_watts: 10.0,
            active_watts_per_thread: 5.0,
        }
    }
}

impl EnergyConfig {
    /// Checks the model's parameters: finite, not negative, at most 100 kW.
    pub fn validate(&self) -> Result<(), String> {
        for (name, w) in [
            ("idle watts", self.idle_watts),
            ("active watts per thread", self.active_watts_per_thread),
        ] {
            if !(0.0..=100_000.0).contains(&w) {
                return Err(format!(
                    "energy model {name} must be in 0..=100000, got {w}"
                ));
            }
        }
        Ok(())
    }
}

/// A source of energy readings.
pub(crate) trait EnergyMeter: Send {
    /// `rapl`, `nvml` or `model`.
    fn name(&self) -> &'static str;
    /// Measured or modelled.
    fn kind(&self) -> EnergyKind;
    /// Microjoules since the previous call (or since the meter was made). `busy` says the
    /// engine computed during that interval; a model uses it, a hardware meter ignores it.
    fn delta_uj(&mut self, busy: bool) -> u64;
}

/// Opens the configured source. Errors name why a requested meter is absent.
pub(crate) fn open_meter(
    config: &EnergyConfig,
    threads: usize,
) -> Result<Box<dyn EnergyMeter>, String> {
    let model = || -> Box<dyn EnergyMeter> {
        Box::new(Modelled::new(
            config.idle_watts,
            config.active_watts_per_thread * threads as f64,
        ))
    };
    match config.source {
        EnergySourceChoice::Model => Ok(model()),
        EnergySourceChoice::Rapl => Ok(Box::new(Rapl::open(Path::new(POWERCAP))?)),
        EnergySourceChoice::Nvml => Ok(Box::new(nvml::Nvml::open()?)),
        EnergySourceChoice::Auto => match Rapl::open(Path::new(POWERCAP)) {
            Ok(r) => Ok(Box::new(r)),
            Err(why) => {
                tracing::debug!(%why, "no RAPL meter; energy is modelled");
                Ok(model())
            }
        },
    }
}

/// The CPU power model: `idle_watts` over every interval, plus `busy_watts` over the intervals
/// the engine computed. Time is measured with the monotonic clock, in whole microseconds
/// carried over between readings so that nothing is lost to rounding.
pub(crate) struct Modelled {
    idle_watts: f64,
    busy_watts: f64,
    last: Instant,
    /// Energy not yet handed out: the fraction of a microjoule below the last reading.
    carry_uj: f64,
}

impl Modelled {
    pub(crate) fn new(idle_watts: f64, busy_watts: f64) -> Self {
        Self {
            idle_watts,
            busy_watts,
            last: Instant::now(),
            carry_uj: 0.0,
        }
    }

    /// Microjoules for an interval of `seconds`.
    fn energy_uj(&mut self, seconds: f64, busy: bool) -> u64 {
        let watts = self.idle_watts + if busy { self.busy_watts } else { 0.0 };
        let uj = watts * seconds * 1e6 + self.carry_uj;
        let whole = uj.floor();
        self.carry_uj = uj - whole;
        whole as u64
    }
}

impl EnergyMeter for Modelled {
    fn name(&self) -> &'static str {
        "model"
    }
    fn kind(&self) -> EnergyKind {
        EnergyKind::Modelled
    }
    fn delta_uj(&mut self, busy: bool) -> u64 {
        let now = Instant::now();
        let seconds = (now - self.last).as_secs_f64();
        self.last = now;
        self.energy_uj(seconds, busy)
    }
}

/// Where Linux exposes powercap zones.
const POWERCAP: &str = "/sys/class/powercap";

/// Linux RAPL package counters.
pub(crate) struct Rapl {
    /// Per package: its `energy_uj` file, counter range and last reading.
    packages: Vec<RaplPackage>,
}

struct RaplPackage {
    energy: PathBuf,
    range_uj: u64,
    last_uj: u64,
}

fn read_u64(path: &Path) -> Result<u64, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.trim()
        .parse()
        .map_err(|_| format!("{}: not a counter: {:?}", path.display(), text.trim()))
}

impl Rapl {
    /// The package domains under `root` (`intel-rapl:N`, not their `intel-rapl:N:M`
    /// subdomains, which the package already counts). Absent when there are none or one of
    /// them cannot be read.
    pub(crate) fn open(root: &Path) -> Result<Self, String> {
        let entries = fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))?;
        let mut packages = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(index) = name.strip_prefix("intel-rapl:") else {
                continue;
            };
            if index.contains(':') {
                continue;
            }
            let dir = entry.path();
            let energy = dir.join("energy_uj");
            let last_uj = read_u64(&energy)?;
            let range_uj = read_u64(&dir.join("max_energy_range_uj"))?;
            if range_uj == 0 {
                return Err(format!("{}: zero counter range", dir.display()));
            }
            packages.push(RaplPackage {
                energy,
                range_uj,
                last_uj,
            });
        }
        if packages.is_empty() {
            return Err(format!("no RAPL package domain under {}", root.display()));
        }
        packages.sort_by(|a, b| a.energy.cmp(&b.energy));
        Ok(Self { packages })
    }
}

/// Microjoules from `last` to `now` on a counter that wraps past `range` back to 0.
fn wrapped_delta(last: u64, now: u64, range: u64) -> u64 {
    if now >= last {
        now - last
    } else {
        range.saturating_sub(last) + now
    }
}

impl EnergyMeter for Rapl {
    fn name(&self) -> &'static str {
        "rapl"
    }
    fn kind(&self) -> EnergyKind {
        EnergyKind::Measured
    }
    fn delta_uj(&mut self, _busy: bool) -> u64 {
        let mut total = 0;
        for p in &mut self.packages {
            // A failed read (the file went away) adds nothing and keeps the last reading.
            if let Ok(now) = read_u64(&p.energy) {
                total += wrapped_delta(p.last_uj, now, p.range_uj);
                p.last_uj = now;
            }
        }
        total
    }
}

/// NVIDIA's management library, opened at run time.
#[allow(unsafe_code)]
mod nvml {
    use super::{EnergyKind, EnergyMeter};
    use libloading::Library;
    use std::ffi::OsStr;

    type Device = *mut std::ffi::c_void;
    type InitFn = unsafe extern "C" fn() -> i32;
    type CountFn = unsafe extern "C" fn(*mut u32) -> i32;
    type HandleFn = unsafe extern "C" fn(u32, *mut Device) -> i32;
    type EnergyFn = unsafe extern "C" fn(Device, *mut u64) -> i32;

    /// The library's name as the NVIDIA driver installs it (found through the dynamic
    /// loader's search path, `LD_LIBRARY_PATH` included).
    const LIBRARY: &str = "libnvidia-ml.so.1";

    /// NVML's total-energy counters (millijoules) of every GPU.
    pub(crate) struct Nvml {
        energy: EnergyFn,
        shutdown: InitFn,
        devices: Vec<Device>,
        last_mj: Vec<u64>,
        /// Keeps the library (and so `energy`) loaded.
        _lib: Library,
    }

    // SAFETY: NVML's device handles are plain identifiers valid for the library's lifetime
    // and its API is thread-safe (NVML documents every call as such); the meter is used from
    // one thread at a time (whichever engine or embedder thread holds its account's lock).
    unsafe impl Send for Nvml {}

    impl Nvml {
        pub(crate) fn open() -> Result<Self, String> {
            Self::open_library(OsStr::new(LIBRARY))
        }

        /// NVML from `library`: a name the dynamic loader looks up, or a path.
        pub(crate) fn open_library(library: &OsStr) -> Result<Self, String> {
            // SAFETY: loading NVML runs its initialisers, which have no preconditions.
            let lib =
                unsafe { Library::new(library) }.map_err(|e| format!("NVML not available: {e}"))?;
            // SAFETY: the symbols' types are NVML's documented C signatures (nvml.h).
            let (init, shutdown, count, handle, energy) = unsafe {
                let init: InitFn = *lib.get::<InitFn>(b"nvmlInit_v2\0").map_err(sym)?;
                let shutdown: InitFn = *lib.get::<InitFn>(b"nvmlShutdown\0").map_err(sym)?;
                let count: CountFn = *lib
                    .get::<CountFn>(b"nvmlDeviceGetCount_v2\0")
                    .map_err(sym)?;
                let handle: HandleFn = *lib
                    .get::<HandleFn>(b"nvmlDeviceGetHandleByIndex_v2\0")
                    .map_err(sym)?;
                let energy: EnergyFn = *lib
                    .get::<EnergyFn>(b"nvmlDeviceGetTotalEnergyConsumption\0")
                    .map_err(sym)?;
                (init, shutdown, count, handle, energy)
            };
            // SAFETY: nvmlInit_v2 takes no arguments; 0 is NVML_SUCCESS.
            let rc = unsafe { init() };
            if rc != 0 {
                return Err(format!("nvmlInit failed (NVML error {rc})"));
            }
            // Initialised from here: made, or shut down again (NVML counts its inits).
            let mut nvml = Self {
                energy,
                shutdown,
                devices: Vec::new(),
                last_mj: Vec::new(),
                _lib: lib,
            };
            let mut n = 0u32;
            // SAFETY: `n` is a valid out-pointer for the call.
            let rc = unsafe { count(&mut n) };
            if rc != 0 || n == 0 {
                return Err(format!("no NVIDIA GPU (NVML error {rc}, {n} devices)"));
            }
            for i in 0..n.min(64) {
                let mut d: Device = std::ptr::null_mut();
                let mut mj = 0u64;
                // SAFETY: valid out-pointers; `d` is used only after NVML_SUCCESS.
                let ok = unsafe { handle(i, &mut d) == 0 && energy(d, &mut mj) == 0 };
                if !ok {
                    return Err(format!("GPU {i} has no total-energy counter"));
                }
                nvml.devices.push(d);
                nvml.last_mj.push(mj);
            }
            Ok(nvml)
        }
    }

    impl Drop for Nvml {
        fn drop(&mut self) {
            // SAFETY: paired with the successful nvmlInit_v2 that made `self`; the library is
            // still loaded (`_lib` drops after this).
            unsafe { (self.shutdown)() };
        }
    }

    fn sym(e: libloading::Error) -> String {
        format!("NVML lacks a function: {e}")
    }

    impl EnergyMeter for Nvml {
        fn name(&self) -> &'static str {
            "nvml"
        }
        fn kind(&self) -> EnergyKind {
            EnergyKind::Measured
        }
        fn delta_uj(&mut self, _busy: bool) -> u64 {
            let mut total = 0;
            for (d, last) in self.devices.iter().zip(&mut self.last_mj) {
                let mut mj = 0u64;
                // SAFETY: `d` came from NVML and the library is still loaded. A failed read
                // adds nothing and keeps the last reading.
                if unsafe { (self.energy)(*d, &mut mj) } == 0 {
                    total = mj
                        .saturating_sub(*last)
                        .saturating_mul(1000)
                        .saturating_add(total);
                    *last = mj;
                }
            }
            total
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::energy::{EnergyAccount, EnergyLedger};
        use crate::metrics::Metrics;
        use std::path::{Path, PathBuf};
        use std::sync::Arc;

        /// Builds `testdata/simulated_nvml.c` (NVML's five functions over counters a test
        /// moves) into a library of its own; returns its path.
        pub(crate) fn build_simulated_nvml(dir: &Path) -> PathBuf {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/simulated_nvml.c");
            build_library(&dir.join(LIBRARY), &std::fs::read_to_string(src).unwrap())
        }

        /// Compiles C `source` into the shared library `out` with `cc`.
        fn build_library(out: &Path, source: &str) -> PathBuf {
            std::fs::create_dir_all(out.parent().unwrap()).unwrap();
            let src = out.with_extension("c");
            std::fs::write(&src, source).unwrap();
            let built = std::process::Command::new("cc")
                .args(["-shared", "-fPIC", "-O1", "-o"])
                .arg(out)
                .arg(&src)
                .output()
                .expect("a C compiler (`cc`) builds the test library");
            assert!(
                built.status.success(),
                "cc failed: {}",
                String::from_utf8_lossy(&built.stderr)
            );
            out.to_path_buf()
        }

        #[test]
        fn nvml_meter_on_a_simulated_library_sums_gpus_and_labels_measured() {
            let dir = std::env::temp_dir().join(format!("souverain-nvml-{}", std::process::id()));
            let path = build_simulated_nvml(&dir);
            // The test's own handle on the same library (the loader shares one copy, so its
            // controls move the meter's counters).
            // SAFETY: the simulated library has no initialisers.
            let ctl = unsafe { Library::new(&path) }.unwrap();
            type Ctl2 = unsafe extern "C" fn(u32, i32);
            type Add = unsafe extern "C" fn(u32, u64);
            type Ctl1 = unsafe extern "C" fn(i32);
            // SAFETY: the controls' types are their C definitions in simulated_nvml.c.
            let (configure_fn, add_fn, fail_fn, init_error_fn) = unsafe {
                (
                    *ctl.get::<Ctl2>(b"simulated_nvml_configure\0").unwrap(),
                    *ctl.get::<Add>(b"simulated_nvml_add\0").unwrap(),
                    *ctl.get::<Ctl1>(b"simulated_nvml_fail\0").unwrap(),
                    *ctl.get::<Ctl1>(b"simulated_nvml_init_error\0").unwrap(),
                )
            };
            // SAFETY: the controls take plain integers; `ctl` outlives them.
            let configure = |n: u32, fail: i32| unsafe { configure_fn(n, fail) };
            // SAFETY: as above.
            let add = |gpu: u32, mj: u64| unsafe { add_fn(gpu, mj) };
            // SAFETY: as above.
            let fail = |gpu: i32| unsafe { fail_fn(gpu) };
            // SAFETY: as above.
            let init_error = |code: i32| unsafe { init_error_fn(code) };
            let open = || Nvml::open_library(path.as_os_str());

            // Failures are errors that say why, never a meter.
            init_error(3);
            assert_eq!(open().err().unwrap(), "nvmlInit failed (NVML error 3)");
            init_error(-1);
            configure(0, -1);
            assert!(open().err().unwrap().contains("no NVIDIA GPU"));
            configure(3, 2);
            assert_eq!(open().err().unwrap(), "GPU 2 has no total-energy counter");
            // A library without NVML's functions is not NVML.
            let other = build_library(&dir.join("libother.so"), "int not_nvml;\n");
            let err = Nvml::open_library(other.as_os_str()).err().unwrap();
            assert!(err.contains("NVML lacks a function"), "{err}");

            // Three GPUs: their counters' growth since the last reading, in microjoules.
            configure(3, -1);
            let mut nvml = open().unwrap();
            assert_eq!((nvml.name(), nvml.kind()), ("nvml", EnergyKind::Measured));
            assert_eq!(nvml.devices.len(), 3);
            assert_eq!(nvml.delta_uj(true), 0);
            // Another meter (another model's engine) shuts NVML down when it drops; NVML
            // counts its initialisations, so this one keeps reading.
            drop(open().unwrap());
            add(0, 5);
            add(1, 7);
            add(2, 11);
            assert_eq!(nvml.delta_uj(true), 23_000);
            // A GPU whose read fails adds nothing and keeps its last reading: its joules come
            // with the next reading that works.
            fail(1);
            add(0, 1);
            add(1, 100);
            assert_eq!(nvml.delta_uj(false), 1_000);
            fail(-1);
            assert_eq!(nvml.delta_uj(false), 100_000);

            // Through the ledger: requests and idle sum to the counters' growth, labelled
            // measured, the meter named.
            let metrics = Arc::new(Metrics::default());
            let account = Arc::new(EnergyAccount::with_meter(Box::new(nvml)));
            let mut ledger = EnergyLedger::new(account.clone(), metrics.clone(), 2);
            assert_eq!(ledger.kind(), EnergyKind::Measured);
            add(2, 4);
            ledger.begin();
            add(0, 9);
            add(1, 3);
            let parts = ledger.step(&[1.0, 2.0, 1.0]);
            assert_eq!(account.idle_uj(), 4_000);
            assert_eq!(parts, vec![3_000, 6_000, 3_000]);
            let snap = metrics.snapshot();
            assert_eq!(snap.energy.requests_uj + snap.energy.idle_uj, 16_000);
            assert_eq!(
                (snap.energy.meter, snap.energy.kind),
                ("nvml", EnergyKind::Measured)
            );
            drop(ledger);
            drop(ctl);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

/// What a chunk of a step costs, in floating-point operations: the weight by which a step's
/// energy is split.
///
/// Every token of a step, prompt or decode, goes through the same batched matrix products, so
/// a token's dense cost is `2 × parameters` (one multiply-add per weight) and the weights'
/// trip from memory is shared by every token of the step: a decode token and a prompt token
/// at the same position cost the same (`c_prefill = c_decode`). What differs is attention: a
/// token at position `p` multiplies its query with `p + 1` keys and its weights with as many
/// values, `4 × layers × heads × head_dim × (p + 1)` operations, so late positions (long
/// prompts, long answers) weigh more. Sliding windows and experts are not modelled (each
/// token counts every parameter and every position).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct CostModel {
    pub(crate) dense_flops_per_token: f64,
    pub(crate) attention_flops_per_position: f64,
}

impl CostModel {
    pub(crate) fn new(n_params: u64, n_layers: usize, n_heads: usize, head_dim: usize) -> Self {
        Self {
            dense_flops_per_token: 2.0 * n_params as f64,
            attention_flops_per_position: 4.0 * (n_layers * n_heads * head_dim) as f64,
        }
    }

    /// The cost of `n` tokens at positions `start..start + n`.
    pub(crate) fn chunk(&self, start: usize, n: usize) -> f64 {
        let (s, n) = (start as f64, n as f64);
        // Σ_{p = start}^{start + n - 1} (p + 1) = n·start + n(n + 1)/2
        let positions = n * s + n * (n + 1.0) / 2.0;
        n * self.dense_flops_per_token + positions * self.attention_flops_per_position
    }
}

/// Splits `total` into parts proportional to `weights` that sum exactly to `total`: each part
/// is its share rounded down, and what rounding left goes one microjoule at a time to the
/// largest remainders. Weights that are all zero (or not finite) share equally.
pub(crate) fn split(total: u64, weights: &[f64]) -> Vec<u64> {
    if weights.is_empty() {
        return Vec::new();
    }
    let usable = weights.iter().all(|w| w.is_finite() && *w >= 0.0);
    let sum: f64 = if usable { weights.iter().sum() } else { 0.0 };
    let shares: Vec<f64> = if sum > 0.0 {
        weights.iter().map(|w| total as f64 * w / sum).collect()
    } else {
        vec![total as f64 / weights.len() as f64; weights.len()]
    };
    let mut parts: Vec<u64> = shares.iter().map(|s| s.floor() as u64).collect();
    // Rounding of the shares themselves may overshoot by a few units at huge totals: trim.
    while parts.iter().sum::<u64>() > total {
        if let Some(p) = parts.iter_mut().filter(|p| **p > 0).max() {
            *p -= 1;
        }
    }
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by(|&a, &b| {
        let ra = shares[a] - shares[a].floor();
        let rb = shares[b] - shares[b].floor();
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    let mut left = total - parts.iter().sum::<u64>();
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        parts[i] += 1;
        left -= 1;
    }
    parts
}

/// One step open on an [`EnergyAccount`]: the energy it has been given so far.
#[derive(Debug)]
struct OpenStep {
    id: u64,
    /// Its share of an interval it spends computing beside other engines' steps.
    share: f64,
    uj: u64,
}

/// The meter and the steps it is reading for.
struct Account {
    meter: Box<dyn EnergyMeter>,
    open: Vec<OpenStep>,
    next_id: u64,
}

/// The process's energy account: one meter, read by every engine of the process (each chat
/// model's engine thread and the embedding model) when each of their steps starts and ends.
///
/// A meter measures the machine (RAPL its packages, NVML its GPUs) or models it (idle watts
/// plus busy watts), not one engine: engines with a meter each would each count the whole
/// machine. Here the energy between two readings goes to the steps open during it, split by
/// their shares (the worker threads each computes with: engines time-share the cores), or to
/// idle when none is open. So over any interval the steps' microjoules plus idle equal the
/// meter's total exactly, however many engines read it.
pub struct EnergyAccount {
    state: std::sync::Mutex<Account>,
    meter: &'static str,
    kind: EnergyKind,
    idle_uj: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for EnergyAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnergyAccount")
            .field("meter", &self.meter)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// A step open on an account, to be closed by [`EnergyAccount::end`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StepId(u64);

impl EnergyAccount {
    /// The configured source for a process whose engines compute with `threads` worker
    /// threads (the model's busy power). Errors name why a requested meter is absent.
    pub fn open(config: &EnergyConfig, threads: usize) -> Result<Arc<Self>, String> {
        config.validate()?;
        let meter = open_meter(config, threads)?;
        tracing::info!(
            source = meter.name(),
            kind = meter.kind().as_str(),
            "energy metering"
        );
        let account = Arc::new(Self::with_meter(meter));
        // Read at least once a second whatever the engines do (none may be loaded), so that
        // idle energy shows and a wrapping counter is never read too rarely; the thread ends
        // with the account.
        let weak = Arc::downgrade(&account);
        let ticker = std::thread::Builder::new()
            .name("energy-meter".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    match weak.upgrade() {
                        Some(account) => account.tick(),
                        None => return,
                    }
                }
            });
        if let Err(e) = ticker {
            // The engines' idle readings still come, once a second while they wait.
            tracing::warn!(error = %e, "no energy meter thread");
        }
        Ok(account)
    }

    pub(crate) fn with_meter(meter: Box<dyn EnergyMeter>) -> Self {
        Self {
            meter: meter.name(),
            kind: meter.kind(),
            state: std::sync::Mutex::new(Account {
                meter,
                open: Vec::new(),
                next_id: 0,
            }),
            idle_uj: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `rapl`, `nvml` or `model`.
    pub fn meter(&self) -> &'static str {
        self.meter
    }

    /// Measured or modelled.
    pub fn kind(&self) -> EnergyKind {
        self.kind
    }

    /// Microjoules that came while no step of any engine was open.
    pub fn idle_uj(&self) -> u64 {
        self.idle_uj.load(Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Account> {
        // The account's state stays consistent between its statements: a panic elsewhere
        // while it was held leaves nothing half done.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the meter: what came since the last reading goes to the open steps, or to idle.
    fn read(&self, a: &mut Account) {
        let uj = a.meter.delta_uj(!a.open.is_empty());
        match a.open.as_mut_slice() {
            [] => {
                self.idle_uj.fetch_add(uj, Relaxed);
                return;
            }
            // One engine computing (the usual case): all of it, nothing to split.
            [only] => {
                only.uj = only.uj.saturating_add(uj);
                return;
            }
            _ => {}
        }
        let shares: Vec<f64> = a.open.iter().map(|s| s.share).collect();
        for (step, part) in a.open.iter_mut().zip(split(uj, &shares)) {
            step.uj = step.uj.saturating_add(part);
        }
    }

    /// Reads the meter (an idle engine does at least once a second, so that idle energy
    /// shows and a wrapping counter is never read too rarely).
    pub(crate) fn tick(&self) {
        let mut a = self.lock();
        self.read(&mut a);
    }

    /// Opens a step computing with `share` (its worker threads) from now.
    fn begin(&self, share: f64) -> StepId {
        let mut a = self.lock();
        self.read(&mut a);
        let id = a.next_id;
        a.next_id += 1;
        a.open.push(OpenStep {
            id,
            share: if share.is_finite() && share > 0.0 {
                share
            } else {
                1.0
            },
            uj: 0,
        });
        StepId(id)
    }

    /// Closes a step: the microjoules it was given while open.
    fn end(&self, id: StepId) -> u64 {
        let mut a = self.lock();
        self.read(&mut a);
        match a.open.iter().position(|s| s.id == id.0) {
            Some(i) => a.open.swap_remove(i).uj,
            None => 0,
        }
    }

    /// Counts energy a closed step used but charged to no request as idle.
    pub(crate) fn add_idle(&self, uj: u64) {
        self.idle_uj.fetch_add(uj, Relaxed);
    }

    /// Opens a step that closes when [`OpenedStep::close`] is called, or as idle when it is
    /// dropped unclosed (its work failed or unwound, its engine stopped): never left open,
    /// where it would take a share of every later interval.
    pub(crate) fn open_step(self: &Arc<Self>, share: f64) -> OpenedStep {
        OpenedStep {
            id: Some(self.begin(share)),
            account: Arc::clone(self),
        }
    }

    /// The account's figures beside `requests_uj` (an engine's or the embedder's).
    pub fn snapshot(&self, requests_uj: u64) -> EnergySnapshot {
        EnergySnapshot {
            meter: self.meter,
            kind: self.kind,
            requests_uj,
            idle_uj: self.idle_uj(),
        }
    }
}

/// A step on an [`EnergyAccount`], closed exactly once.
pub(crate) struct OpenedStep {
    account: Arc<EnergyAccount>,
    id: Option<StepId>,
}

impl OpenedStep {
    /// Closes the step: the microjoules it was given.
    pub(crate) fn close(mut self) -> u64 {
        self.id.take().map_or(0, |id| self.account.end(id))
    }
}

impl Drop for OpenedStep {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.account.add_idle(self.account.end(id));
        }
    }
}

/// One engine's energy accounts: its steps on the process's [`EnergyAccount`], and the
/// totals it publishes.
pub(crate) struct EnergyLedger {
    account: Arc<EnergyAccount>,
    metrics: Arc<Metrics>,
    /// The worker threads the engine computes with: its steps' share of a shared interval.
    share: f64,
    /// The step computing now. One that never reaches [`EnergyLedger::step`] (an early return
    /// between them, the engine stopping) closes as idle when it is replaced or dropped.
    open: Option<OpenedStep>,
}

impl EnergyLedger {
    pub(crate) fn new(account: Arc<EnergyAccount>, metrics: Arc<Metrics>, threads: usize) -> Self {
        let _ = metrics.energy_account.set(account.clone());
        Self {
            account,
            metrics,
            share: threads.max(1) as f64,
            open: None,
        }
    }

    /// Measured or modelled.
    pub(crate) fn kind(&self) -> EnergyKind {
        self.account.kind()
    }

    /// Reads the meter while the engine waits for work.
    pub(crate) fn tick(&mut self) {
        self.open = None;
        self.account.tick();
    }

    /// A step starts: what came since the last reading was idle (or other engines' steps).
    pub(crate) fn begin(&mut self) {
        // An unfinished step closes (its reading) before the new one opens (its own).
        self.open = None;
        self.open = Some(self.account.open_step(self.share));
    }

    /// The step ends: its energy, split by `weights` (one per chunk), parts summing to it.
    pub(crate) fn step(&mut self, weights: &[f64]) -> Vec<u64> {
        let uj = self.open.take().map_or(0, OpenedStep::close);
        if weights.is_empty() {
            self.account.add_idle(uj);
            return Vec::new();
        }
        self.metrics.energy_requests_uj.fetch_add(uj, Relaxed);
        split(uj, weights)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A meter that hands out scripted microjoules, labelled as a model.
    struct Scripted {
        next: std::vec::IntoIter<u64>,
        total: Arc<std::sync::atomic::AtomicU64>,
    }

    impl EnergyMeter for Scripted {
        fn name(&self) -> &'static str {
            "model"
        }
        fn kind(&self) -> EnergyKind {
            EnergyKind::Modelled
        }
        fn delta_uj(&mut self, _busy: bool) -> u64 {
            let uj = self.next.next().unwrap_or(0);
            self.total.fetch_add(uj, Relaxed);
            uj
        }
    }

    #[test]
    fn split_sums_exactly_and_follows_weights() {
        assert_eq!(split(10, &[1.0, 1.0, 1.0]), vec![4, 3, 3]);
        assert_eq!(split(0, &[2.0, 5.0]), vec![0, 0]);
        assert_eq!(split(7, &[0.0, 0.0]), vec![4, 3]);
        assert_eq!(split(100, &[3.0, 1.0]), vec![75, 25]);
        assert_eq!(split(5, &[f64::NAN, 1.0]), vec![3, 2]);
        assert!(split(9, &[]).is_empty());
        let big = split(u64::MAX / 2, &[1.0, 3.0, 1e-9]);
        assert_eq!(big.iter().sum::<u64>(), u64::MAX / 2);
    }

    #[test]
    fn cost_model_weighs_positions_and_tokens() {
        let c = CostModel::new(1000, 2, 3, 4);
        // 1 token at position 0: 2000 dense + 96 × 1 attention.
        assert_eq!(c.chunk(0, 1), 2096.0);
        // A chunk costs what its tokens cost one by one (prefill = decode at equal positions).
        let by_token: f64 = (5..9).map(|p| c.chunk(p, 1)).sum();
        assert_eq!(c.chunk(5, 4), by_token);
        assert!(c.chunk(100, 1) > c.chunk(0, 1));
    }

    #[test]
    fn rapl_reads_packages_handles_wrap_and_is_absent_when_unreadable() {
        let root = std::env::temp_dir().join(format!("souverain-rapl-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let write = |dir: &str, file: &str, v: &str| {
            let d = root.join(dir);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join(file), v).unwrap();
        };
        assert!(Rapl::open(&root.join("missing")).is_err());
        write("intel-rapl:0", "energy_uj", "999000\n");
        write("intel-rapl:0", "max_energy_range_uj", "1000000\n");
        // A subdomain (counted in its package already) and another zone type are ignored.
        write("intel-rapl:0:0", "energy_uj", "5\n");
        write("intel-rapl:0:0", "max_energy_range_uj", "10\n");
        write("intel-rapl-mmio:0", "energy_uj", "5\n");
        write("intel-rapl:1", "energy_uj", "100\n");
        write("intel-rapl:1", "max_energy_range_uj", "1000000\n");
        let mut rapl = Rapl::open(&root).unwrap();
        assert_eq!(rapl.kind(), EnergyKind::Measured);
        assert_eq!(rapl.packages.len(), 2);
        // Package 0 wraps: 999000 → 1000000 → 500 is 1500 µJ; package 1 adds 50.
        write("intel-rapl:0", "energy_uj", "500\n");
        write("intel-rapl:1", "energy_uj", "150\n");
        assert_eq!(rapl.delta_uj(true), 1550);
        assert_eq!(rapl.delta_uj(false), 0);
        write("intel-rapl:1", "energy_uj", "garbage\n");
        assert!(Rapl::open(&root).is_err());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn nvml_is_absent_without_the_library_and_auto_falls_back_to_the_model() {
        // This machine has no NVIDIA driver: asking for NVML is a clear error, never a panic.
        if std::path::Path::new("/proc/driver/nvidia").exists() {
            return;
        }
        let nvml = EnergyConfig {
            source: EnergySourceChoice::Nvml,
            ..EnergyConfig::default()
        };
        let err = open_meter(&nvml, 2).err().unwrap();
        assert!(err.contains("NVML"), "{err}");
        let auto = open_meter(&EnergyConfig::default(), 2).unwrap();
        if Rapl::open(Path::new(POWERCAP)).is_err() {
            assert_eq!(auto.name(), "model");
            assert_eq!(auto.kind(), EnergyKind::Modelled);
        }
    }

    #[test]
    fn model_charges_idle_watts_always_and_busy_watts_while_computing() {
        let mut m = Modelled::new(10.0, 40.0);
        assert_eq!(m.kind(), EnergyKind::Modelled);
        assert_eq!(m.energy_uj(0.5, false), 5_000_000);
        assert_eq!(m.energy_uj(0.5, true), 25_000_000);
        // Fractions of a microjoule are carried, not lost.
        let parts: u64 = (0..1000).map(|_| m.energy_uj(1e-9, true)).sum();
        assert_eq!(parts, 50);
        assert!(EnergyConfig::default().validate().is_ok());
        let bad = EnergyConfig {
            idle_watts: -1.0,
            ..EnergyConfig::default()
        };
        assert!(bad.validate().is_err());
        assert!("sun".parse::<EnergySourceChoice>().is_err());
        assert_eq!("nvml".parse(), Ok(EnergySourceChoice::Nvml));
    }

    #[test]
    fn requests_and_idle_sum_to_the_meter_total() {
        let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
        // Uneven readings, idle gaps between steps, steps of 1 to 5 chunks.
        let readings: Vec<u64> = (0..400u64).map(|i| (i * 7919) % 100_003).collect();
        let meter = Scripted {
            next: readings.into_iter(),
            total: total.clone(),
        };
        let metrics = Arc::new(Metrics::default());
        let account = Arc::new(EnergyAccount::with_meter(Box::new(meter)));
        let mut ledger = EnergyLedger::new(account.clone(), metrics.clone(), 2);
        assert_eq!(ledger.kind(), EnergyKind::Modelled);
        let cost = CostModel::new(135_000_000, 30, 9, 64);
        let mut requests = 0u64;
        for step in 0..200usize {
            if step % 3 == 0 {
                ledger.tick();
            }
            ledger.begin();
            // Mixed chunks: decode tokens at growing positions, prompt chunks of many tokens.
            let weights: Vec<f64> = (0..=step % 5)
                .map(|k| {
                    if k % 2 == 0 {
                        cost.chunk(step + k * 10, 1)
                    } else {
                        cost.chunk(0, 1 + step % 64)
                    }
                })
                .collect();
            requests += ledger.step(&weights).iter().sum::<u64>();
        }
        let snap = metrics.snapshot();
        let idle = account.idle_uj();
        assert_eq!(requests + idle, total.load(Relaxed));
        assert_eq!(snap.energy.requests_uj, requests);
        assert_eq!(snap.energy.idle_uj, idle);
        assert!(idle > 0 && requests > 0);
        // A modelled source is never labelled measured.
        assert_eq!(snap.energy.kind, EnergyKind::Modelled);
    }

    /// A meter whose every reading is `per_read` microjoules.
    struct Steady {
        per_read: u64,
        busy_reads: Arc<std::sync::atomic::AtomicU64>,
    }

    impl EnergyMeter for Steady {
        fn name(&self) -> &'static str {
            "model"
        }
        fn kind(&self) -> EnergyKind {
            EnergyKind::Modelled
        }
        fn delta_uj(&mut self, busy: bool) -> u64 {
            if busy {
                self.busy_reads.fetch_add(1, Relaxed);
            }
            self.per_read
        }
    }

    #[test]
    fn engines_on_one_account_share_its_meter_and_count_the_machine_once() {
        let busy_reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let account = Arc::new(EnergyAccount::with_meter(Box::new(Steady {
            per_read: 600,
            busy_reads: busy_reads.clone(),
        })));
        let (ma, mb) = (Arc::new(Metrics::default()), Arc::new(Metrics::default()));
        // Engine A computes with 2 threads, engine B with 1.
        let mut a = EnergyLedger::new(account.clone(), ma.clone(), 2);
        let mut b = EnergyLedger::new(account.clone(), mb.clone(), 1);
        // Readings: A begins (600 idle), B begins (600 to A alone), A ends (600 split 2:1),
        // B ends (600 to B alone), B ticks idle (600).
        a.begin();
        b.begin();
        let pa = a.step(&[1.0, 1.0]);
        let pb = b.step(&[3.0]);
        b.tick();
        assert_eq!(pa, vec![500, 500]);
        assert_eq!(pb, vec![800]);
        assert_eq!(account.idle_uj(), 1_200);
        assert_eq!(
            ma.snapshot().energy.requests_uj + mb.snapshot().energy.requests_uj + 1_200,
            5 * 600
        );
        // Both engines' snapshots show the process's one idle figure, not one each.
        assert_eq!(ma.snapshot().energy.idle_uj, mb.snapshot().energy.idle_uj);
        // The meter was told the machine was busy only while a step was open.
        assert_eq!(busy_reads.load(Relaxed), 3);
        // A step that never ends (an early return) counts as idle at the next
        // reading of its engine; an empty step's energy is idle too. Five readings: A
        // begins, A's tick closes its step and reads again, B begins, B's empty step ends.
        a.begin();
        a.tick();
        b.begin();
        assert!(b.step(&[]).is_empty());
        assert_eq!(account.idle_uj(), 1_200 + 5 * 600);
        assert_eq!(ma.snapshot().energy.requests_uj, 1_000);
        // An engine that stops with a step open, and a step dropped unclosed, close as idle:
        // a later step alone gets every reading of its own.
        a.begin();
        drop(a);
        drop(account.open_step(1.0));
        let idle = account.idle_uj();
        b.begin();
        assert_eq!(b.step(&[1.0]), vec![600]);
        assert_eq!(account.idle_uj(), idle + 600);
    }
}
