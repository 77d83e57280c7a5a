//! The `wasmgate` command: `run` serves a config, `check` validates a config
//! and its plugins without serving, `reload` asks a running gateway to
//! reload, `plugin inspect` and `plugin test` look at one plugin file,
//! `plugin new` and `plugin build` make and build a plugin project.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wasmgate::config::LogFormat;
use wasmgate::control::gateway::{Gateway, prepare};
use wasmgate::control::plugin_project::{self, Kind, Language};
use wasmgate::{Config, config};

#[derive(Parser)]
#[command(
    name = "wasmgate",
    version = wasmgate::control::build_info::LONG_VERSION,
    about = "An edge gateway whose decisions run in WebAssembly"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the listeners of a config file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and load its plugins, without serving.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Ask a running gateway to reload its config file (`POST /reload` on its
    /// admin listener) and print what changed, or why it was refused.
    Reload {
        /// The admin listener, `ip:port`.
        #[arg(long)]
        admin: std::net::SocketAddr,
        /// The file holding the admin bearer token (`[admin] token_file`).
        #[arg(long)]
        token_file: PathBuf,
    },
    /// Work with plugin files.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Create a plugin project (source, settings, request tests, the WIT
    /// contract, a README and its build manifest) in a new directory.
    New {
        /// The language of the project.
        #[arg(long, value_enum)]
        lang: Language,
        /// A router picks where a request goes; a WAF allows or denies it.
        #[arg(long, value_enum)]
        kind: Kind,
        /// The plugin's name (its file will be NAME.wasm, its settings NAME.toml).
        name: String,
        /// Where to create it (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Build the plugin project in DIR (default: the current directory) with
    /// the commands its wasmgate-plugin.toml names, leaving DIR/NAME.wasm.
    Build { dir: Option<PathBuf> },
    /// Print a component's world, imports and exports, and whether the
    /// gateway would accept it.
    Inspect { file: PathBuf },
    /// Ask a plugin about one described request, under the gateway's
    /// sandbox and limits; print its decision and the call time. Fails when
    /// the request file's `expect` does not match.
    Test {
        file: PathBuf,
        /// TOML files describing a request each (and `expect`).
        #[arg(long, required = true, num_args = 1..)]
        request: Vec<PathBuf>,
        /// The plugin's settings (default: the NAME.toml beside the file).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// jemalloc, chosen by measurement against glibc's malloc and mimalloc
/// (bench/compare; see host/Cargo.toml).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read when it starts: a background thread returns
/// freed pages to the system over `dirty_decay_ms` (10 s) even while the
/// gateway is idle, so the memory of closed connections comes back.
/// `_RJEM_MALLOC_CONF` in the environment overrides it.
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: Option<&'static std::ffi::c_char> = Some(unsafe { &*c"background_thread:true".as_ptr() });

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` logs as its config's `[log] format` says (a config that does
    // not load is reported by `run` itself, in text).
    let json = match &cli.command {
        Command::Run { config } => Config::load(config).is_ok_and(|c| c.log.format == LogFormat::Json),
        _ => false,
    };
    let logger = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("WASMGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr);
    if json {
        logger.json().with_ansi(false).init();
    } else {
        // Colours only for a person at a terminal, never into a file or a pipe.
        logger.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let runtime = match runtime(cpus) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { config } => {
                let threads = match tokio::runtime::Handle::current().runtime_flavor() {
                    tokio::runtime::RuntimeFlavor::CurrentThread => "one (current-thread)",
                    _ => "one worker per CPU",
                };
                tracing::info!(cpus, threads, "async runtime");
                run(config).await
            }
            Command::Check { config } => check(config).await,
            Command::Reload { admin, token_file } => reload(admin, token_file).await,
            Command::Plugin { command: PluginCommand::Inspect { file } } => inspect(file).await,
            Command::Plugin { command: PluginCommand::Test { file, request, config } } => {
                plugin_test(file, request, config).await
            }
            Command::Plugin { command: PluginCommand::New { lang, kind, name, dir } } => {
                plugin_new(lang, kind, name, dir)
            }
            Command::Plugin { command: PluginCommand::Build { dir } } => plugin_build(dir).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The async runtime for a process allowed `cpus` CPUs (its affinity and
/// cgroup quota, as the standard library reads them). On one CPU, one
/// current-thread runtime: `bench/compare` measured it cheaper than a
/// multi-thread runtime's single worker (per HTTP request 22.3 against
/// 23.3 µs of CPU, per WebSocket handshake 85 against 94). On more, the
/// multi-thread runtime, a worker per CPU, stealing work between them.
fn runtime(cpus: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if cpus == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    }
}

async fn run(path: PathBuf) -> anyhow::Result<()> {
    // Start-up (compiling plugins) can take seconds: SIGHUP, SIGUSR1 and
    // SIGUSR2 must not kill the process meanwhile (their default action).
    // A handler registered once stays for the process's life; the serving
    // loop acts on the ones that arrive after it starts.
    use tokio::signal::unix::{SignalKind, signal};
    for kind in [SignalKind::hangup(), SignalKind::user_defined1(), SignalKind::user_defined2()] {
        drop(signal(kind)?);
    }
    let config = Config::load(&path)?;
    let gateway = Gateway::start(config).await?;
    gateway.run_until_stopped().await
}

async fn check(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    let prepared = prepare(config).await?;
    let config::Config { listener, pool, .. } = &prepared.config;
    println!("{}: OK", path.display());
    println!("  {} listener(s), {} pool(s)", listener.len(), pool.len());
    for plugin in prepared.registry.all() {
        println!(
            "  plugin {} ({}), sha256 {}, timeout {} ms, memory {} MiB, on_error {:?}",
            plugin.name,
            plugin.kind,
            &plugin.identity.sha256[..16],
            plugin.limits.call_timeout.as_millis(),
            plugin.limits.memory_limit_bytes >> 20,
            plugin.limits.on_error
        );
    }
    Ok(())
}

async fn reload(admin: std::net::SocketAddr, token_file: PathBuf) -> anyhow::Result<()> {
    use anyhow::Context;
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading the token file {}", token_file.display()))?;
    let (status, body) = wasmgate::control::admin::post(admin, "/reload", token.trim())
        .await
        .with_context(|| format!("asking the gateway at {admin} to reload"))?;
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(report) => println!("{}", serde_json::to_string_pretty(&report)?),
        Err(_) => print!("{body}"),
    }
    if status.is_success() { Ok(()) } else { anyhow::bail!("reload not applied ({status})") }
}

async fn inspect(file: PathBuf) -> anyhow::Result<()> {
    let report = wasmgate::plugin::inspect::inspect(&file).await?;
    print!("{report}");
    if report.accepted() { Ok(()) } else { anyhow::bail!("{}: the gateway would reject this plugin", file.display()) }
}

async fn plugin_test(file: PathBuf, requests: Vec<PathBuf>, config: Option<PathBuf>) -> anyhow::Result<()> {
    let report = wasmgate::control::plugin_test::run(&file, &requests, config.as_deref()).await?;
    print!("{}", report.text);
    if report.passed { Ok(()) } else { anyhow::bail!("a decision is not the expected one") }
}

fn plugin_new(lang: Language, kind: Kind, name: String, dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
    let created = plugin_project::new(lang, kind, &name, &dir)?;
    println!("created {} ({lang} {kind}), {} files", created.dir.display(), created.files.len());
    let me = command_name();
    println!("next:");
    println!("  cd {}", shell_quoted(&created.dir.display().to_string()));
    println!("  {} plugin build", shell_quoted(&me));
    println!("  {} plugin test {name}.wasm --request tests/*.toml", shell_quoted(&me));
    Ok(())
}

/// `text` as one shell word.
fn shell_quoted(text: &str) -> String {
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || "._/-+=:,@".contains(c)) {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// How to run this binary from anywhere: `wasmgate` when that is what PATH
/// finds, else its full path.
fn command_name() -> String {
    let me = std::env::current_exe().and_then(std::fs::canonicalize).ok();
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|d| d.join("wasmgate")).find(|p| p.is_file()))
        .and_then(|p| std::fs::canonicalize(p).ok());
    match me {
        Some(me) if on_path.as_ref() != Some(&me) => me.display().to_string(),
        _ => "wasmgate".into(),
    }
}

async fn plugin_build(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = dir.unwrap_or_else(|| PathBuf::from("."));
    // The build's commands run for seconds to minutes: off the async runtime.
    let built = tokio::task::spawn_blocking(move || plugin_project::build(&dir)).await??;
    plugin_project::verify(&built).await?;
    eprintln!("built {} ({}, {} bytes), accepted by the gateway", built.name, built.kind, built.size);
    println!("{}", built.component.display());
    Ok(())
}
