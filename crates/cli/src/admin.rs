//! The control plane from the command line: `serve --auth` opens it for the server, and
//! `souverain admin ...` manages organisations, projects, keys, usage and the audit log
//! directly on the store (the same SQLite file or PostgreSQL database the server uses; SQLite
//! lets both work at once).
//!
//! The secret that keys API-key hashes lives in `DATA_DIR/key-hash.secret` (made on first
//! use, mode 0600), or in `SOUVERAIN_KEY_HASH_SECRET` (hex) for fleets that share a database:
//! every process that creates or checks keys must use the same one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use control::usage::{self, GroupBy};
use control::{
    Budget, BudgetPeriod, ControlConfig, ControlPlane, KeyPolicy, PostgresStore, SqliteStore,
    Store, UsageFilter,
};

/// Who admin actions from the command line are recorded as.
const ACTOR: &str = "admin-cli";

/// Where the control plane's state is.
#[derive(Args, Debug, Clone)]
pub(crate) struct StoreArgs {
    /// Directory for the SQLite database and the key-hash secret (default:
    /// `$XDG_DATA_HOME/souverain` or `~/.local/share/souverain`).
    #[arg(long, env = "SOUVERAIN_DATA_DIR", global = true)]
    pub(crate) data_dir: Option<PathBuf>,
    /// PostgreSQL instead of SQLite (`postgres://user:password@host:port/database`).
    #[arg(
        long,
        env = "SOUVERAIN_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    pub(crate) database_url: Option<String>,
    /// This deployment's region label; organisations list the regions they may be served in.
    #[arg(long, env = "SOUVERAIN_REGION", default_value = "local", global = true)]
    pub(crate) region: String,
}

/// `serve`'s control-plane flags.
#[derive(Args, Debug, Clone)]
pub(crate) struct ServeAuthArgs {
    /// Require API keys and enforce their limits, budgets and residency; meter usage and keep
    /// the audit log. Without it the server is the single-user local server and opens no
    /// database.
    #[arg(long)]
    pub(crate) auth: bool,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// File holding the admin API's key (default: `SOUVERAIN_ADMIN_KEY`; neither: no admin API).
    #[arg(long)]
    pub(crate) admin_key_file: Option<PathBuf>,
    /// Reuse an authenticated key for this many milliseconds without reading the database
    /// (0: read it for every request). A revocation made by another process takes effect
    /// within this time. Default: 0 for `serve`, 1000 for `route`.
    #[arg(long, value_name = "MS")]
    pub(crate) key_cache_ms: Option<u64>,
    /// Reserve this many tokens of a key's budget in the database at a time and hand requests
    /// their tokens from memory (0: one database write per request). Never more than a
    /// sixteenth of the budget; a lease idle for a second goes back. Default: 0 for `serve`,
    /// 4096 for `route`.
    #[arg(long, value_name = "TOKENS")]
    pub(crate) budget_lease_tokens: Option<u64>,
}

/// The fast-path settings a command uses when its flags do not say.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HotDefaults {
    pub(crate) key_cache_ms: u64,
    pub(crate) budget_lease_tokens: u64,
}

impl HotDefaults {
    /// `serve`: every request reads and writes the database.
    pub(crate) const SERVE: Self = HotDefaults {
        key_cache_ms: 0,
        budget_lease_tokens: 0,
    };
    /// `route` and `picker`: thousands of requests a second through one process.
    pub(crate) const ROUTE: Self = HotDefaults {
        key_cache_ms: 1000,
        budget_lease_tokens: 4096,
    };
}

/// `souverain admin`.
#[derive(Args, Debug)]
pub(crate) struct AdminArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Organisations.
    #[command(subcommand)]
    Org(OrgCommand),
    /// Projects.
    #[command(subcommand)]
    Project(ProjectCommand),
    /// API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Usage records, filtered and grouped, as JSON or CSV.
    Usage(UsageArgs),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Subcommand, Debug)]
enum OrgCommand {
    /// Create an organisation.
    Create {
        /// Its name.
        name: String,
        /// Regions it may be served in, comma-separated (default: this deployment's).
        #[arg(long, value_delimiter = ',')]
        regions: Option<Vec<String>>,
    },
    /// List organisations.
    List,
    /// Replace an organisation's allowed regions.
    SetRegions {
        /// The organisation's id.
        org: String,
        /// Regions, comma-separated.
        #[arg(value_delimiter = ',')]
        regions: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ProjectCommand {
    /// Create a project.
    Create {
        /// The organisation's id.
        org: String,
        /// Its name.
        name: String,
        /// Keep prompts and outputs this many seconds (default: never stored).
        #[arg(long)]
        retention_secs: Option<i64>,
    },
    /// List an organisation's projects.
    List {
        /// The organisation's id.
        org: String,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Create a key and print it (the only time it is shown).
    Create {
        /// The project's id.
        project: String,
        /// Its name.
        name: String,
        /// Models it may use, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Requests per minute.
        #[arg(long)]
        rpm: Option<u64>,
        /// Tokens per minute.
        #[arg(long)]
        tpm: Option<u64>,
        /// Token budget per period.
        #[arg(long)]
        budget_tokens: Option<u64>,
        /// The budget's period.
        #[arg(long, value_enum, default_value_t = Period::Month)]
        budget_period: Period,
        /// Expiry: a date, a UTC time (`2026-12-31T23:59:59Z`) or Unix milliseconds.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// List a project's keys.
    List {
        /// The project's id.
        project: String,
    },
    /// Revoke a key.
    Revoke {
        /// The key's id.
        key: String,
    },
    /// Show a key's budget in the current period: the limit and the tokens counted against
    /// it (used, reserved by requests in flight, held by budget leases).
    Budget {
        /// The key's id.
        key: String,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Period {
    Hour,
    Day,
    Month,
    Total,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Format {
    Json,
    Csv,
}

#[derive(Args, Debug)]
struct UsageArgs {
    /// From this time (a date, a UTC time or Unix milliseconds).
    #[arg(long)]
    from: Option<String>,
    /// Before this time.
    #[arg(long)]
    to: Option<String>,
    /// Only this organisation.
    #[arg(long)]
    org: Option<String>,
    /// Only this project.
    #[arg(long)]
    project: Option<String>,
    /// Only this key.
    #[arg(long)]
    key: Option<String>,
    /// Group by these, comma-separated: org, project, key, model, status, day, hour.
    #[arg(long)]
    group_by: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Check the hash chain; exits non-zero and names each entry edited, deleted, inserted or
    /// moved.
    Verify,
    /// Print the log as JSON lines.
    List,
}

fn default_data_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME") {
        return Ok(PathBuf::from(dir).join("souverain"));
    }
    let home = std::env::var_os("HOME").context("HOME is not set; pass --data-dir")?;
    Ok(PathBuf::from(home).join(".local/share/souverain"))
}

/// The key-hash secret: from the environment, or the data directory's file (made if absent).
fn key_hash_secret(data_dir: &Path) -> Result<Vec<u8>> {
    if let Ok(hex) = std::env::var("SOUVERAIN_KEY_HASH_SECRET") {
        let secret = control::keys::from_hex(hex.trim())
            .filter(|s| s.len() >= 16)
            .context("SOUVERAIN_KEY_HASH_SECRET must be at least 16 bytes of hex")?;
        return Ok(secret);
    }
    let path = data_dir.join("key-hash.secret");
    match std::fs::read_to_string(&path) {
        Ok(text) => control::keys::from_hex(text.trim())
            .filter(|s| s.len() >= 16)
            .with_context(|| format!("{} does not hold a hex secret", path.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let secret = control::keys::new_server_secret();
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            match options.open(&path) {
                Ok(mut file) => {
                    writeln!(file, "{}", control::keys::to_hex(&secret))
                        .and_then(|()| file.sync_all())
                        .with_context(|| format!("writing {}", path.display()))?;
                    tracing::info!(path = %path.display(), "created the key-hash secret");
                    Ok(secret.to_vec())
                }
                // Another process made it first: use theirs.
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                    key_hash_secret(data_dir)
                }
                Err(err) => Err(err).with_context(|| format!("creating {}", path.display())),
            }
        }
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

/// Opens the store and the control plane.
pub(crate) fn open(args: &StoreArgs, admin_key: Option<String>) -> Result<Arc<ControlPlane>> {
    open_with(args, admin_key, HotDefaults::SERVE)
}

fn open_with(
    args: &StoreArgs,
    admin_key: Option<String>,
    hot: HotDefaults,
) -> Result<Arc<ControlPlane>> {
    if !control::valid_region(&args.region) {
        bail!(
            "--region `{}` is not a region label (1 to 64 of a-z, 0-9 and -)",
            args.region
        );
    }
    let data_dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => default_data_dir()?,
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let store: Arc<dyn Store> = match &args.database_url {
        Some(url) => Arc::new(PostgresStore::connect(url).context("opening PostgreSQL")?),
        None => {
            let path = data_dir.join("control.sqlite3");
            Arc::new(
                SqliteStore::open(&path).with_context(|| format!("opening {}", path.display()))?,
            )
        }
    };
    let mut config = ControlConfig::new(args.region.clone(), key_hash_secret(&data_dir)?);
    config.admin_key = admin_key;
    config.key_cache_ttl = std::time::Duration::from_millis(hot.key_cache_ms);
    config.budget_lease_tokens = hot.budget_lease_tokens;
    Ok(Arc::new(ControlPlane::new(store, config)))
}

/// The control plane for `serve --auth`, with the admin key from its file or the
/// environment.
/// The control plane when `--auth` is given; `None` (no database opened) otherwise.
pub(crate) fn open_if_asked(
    args: &ServeAuthArgs,
    defaults: HotDefaults,
) -> Result<Option<Arc<ControlPlane>>> {
    if args.auth {
        let hot = HotDefaults {
            key_cache_ms: args.key_cache_ms.unwrap_or(defaults.key_cache_ms),
            budget_lease_tokens: args
                .budget_lease_tokens
                .unwrap_or(defaults.budget_lease_tokens),
        };
        open_for_serve(args, hot).map(Some)
    } else {
        Ok(None)
    }
}

fn open_for_serve(args: &ServeAuthArgs, hot: HotDefaults) -> Result<Arc<ControlPlane>> {
    let admin_key = match &args.admin_key_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the admin key from {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => std::env::var("SOUVERAIN_ADMIN_KEY").ok(),
    };
    if let Some(key) = &admin_key
        && key.len() < 16
    {
        bail!("the admin key must be at least 16 characters");
    }
    if admin_key.is_none() {
        tracing::warn!(
            "no admin key (--admin-key-file or SOUVERAIN_ADMIN_KEY): the admin API is off"
        );
    }
    let plane = open_with(&args.store, admin_key, hot)?;
    tracing::info!(
        region = %args.store.region,
        store = plane.store().backend_name(),
        "authentication on"
    );
    Ok(plane)
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("serialising the answer")?;
    println!("{text}");
    Ok(())
}

fn time_arg(name: &str, value: Option<&str>) -> Result<Option<i64>> {
    value
        .map(|v| control::time::parse_time_ms(v).map_err(|e| anyhow::anyhow!("--{name}: {e}")))
        .transpose()
}

/// `souverain admin ...`.
pub(crate) fn run(args: AdminArgs) -> Result<()> {
    let plane = open(&args.store, None)?;
    match args.command {
        AdminCommand::Org(OrgCommand::Create { name, regions }) => {
            print_json(&plane.create_org(ACTOR, &name, regions)?)
        }
        AdminCommand::Org(OrgCommand::List) => print_json(&plane.list_orgs()?),
        AdminCommand::Org(OrgCommand::SetRegions { org, regions }) => {
            print_json(&plane.set_org_regions(ACTOR, &org, regions)?)
        }
        AdminCommand::Project(ProjectCommand::Create {
            org,
            name,
            retention_secs,
        }) => print_json(&plane.create_project(ACTOR, &org, &name, retention_secs)?),
        AdminCommand::Project(ProjectCommand::List { org }) => {
            print_json(&plane.list_projects(&org)?)
        }
        AdminCommand::Key(KeyCommand::Create {
            project,
            name,
            models,
            rpm,
            tpm,
            budget_tokens,
            budget_period,
            expires_at,
        }) => {
            let period = match budget_period {
                Period::Hour => BudgetPeriod::Hour,
                Period::Day => BudgetPeriod::Day,
                Period::Month => BudgetPeriod::Month,
                Period::Total => BudgetPeriod::Total,
            };
            let policy = KeyPolicy {
                allowed_models: models,
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
                budget: budget_tokens.map(|tokens| Budget { tokens, period }),
                expires_at_ms: time_arg("expires-at", expires_at.as_deref())?,
            };
            let created = plane.create_key(ACTOR, &project, &name, policy)?;
            eprintln!("This is the only time the key is shown; store it now.");
            print_json(&serde_json::json!({"key": created.plaintext, "record": created.record}))
        }
        AdminCommand::Key(KeyCommand::List { project }) => print_json(&plane.list_keys(&project)?),
        AdminCommand::Key(KeyCommand::Budget { key }) => match plane.budget_status(&key)? {
            Some(status) => print_json(&status),
            None => bail!("key {key} has no budget"),
        },
        AdminCommand::Key(KeyCommand::Revoke { key }) => {
            plane.revoke_key(ACTOR, &key)?;
            eprintln!("revoked {key}");
            Ok(())
        }
        AdminCommand::Usage(u) => {
            let filter = UsageFilter {
                from_ms: time_arg("from", u.from.as_deref())?,
                to_ms: time_arg("to", u.to.as_deref())?,
                org_id: u.org,
                project_id: u.project,
                key_id: u.key,
            };
            let group_by = u
                .group_by
                .as_deref()
                .map(GroupBy::parse_list)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--group-by: {e}"))?;
            let records = plane.usage(&filter)?;
            match (group_by, u.format) {
                (None, Format::Json) => print_json(&records),
                (None, Format::Csv) => {
                    print!("{}", usage::records_csv(&records));
                    Ok(())
                }
                (Some(g), Format::Json) => print_json(&usage::aggregate(&records, &g)),
                (Some(g), Format::Csv) => {
                    print!("{}", usage::groups_csv(&usage::aggregate(&records, &g), &g));
                    Ok(())
                }
            }
        }
        AdminCommand::Audit(AuditCommand::Verify) => {
            let report = plane.verify_audit()?;
            println!(
                "{} entries, head #{} {}",
                report.entries, report.head_seq, report.head_hash
            );
            if report.is_intact() {
                println!("the audit chain is intact");
                Ok(())
            } else {
                for problem in &report.problems {
                    println!("TAMPERED: {problem}");
                }
                bail!(
                    "the audit chain is broken ({} problem{})",
                    report.problems.len(),
                    if report.problems.len() == 1 { "" } else { "s" }
                )
            }
        }
        AdminCommand::Audit(AuditCommand::List) => {
            let mut out = std::io::stdout().lock();
            for entry in plane.audit_entries()? {
                let line = serde_json::to_string(&entry).context("serialising an entry")?;
                writeln!(out, "{line}")?;
            }
            Ok(())
        }
    }
}
