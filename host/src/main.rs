//! The `wasmgate` command: `run` serves a config, `check` validates a config
//! and its plugins without serving, `reload` asks a running gateway to
//! reload, `plugin inspect` and `plugin test` look at one plugin file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wasmgate::control::gateway::{Gateway, prepare};
use wasmgate::{Config, config};

#[derive(Parser)]
#[command(name = "wasmgate", version, about = "An edge gateway whose decisions run in WebAssembly")]
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
    /// Print a component's world, imports and exports, and whether the
    /// gateway would accept it.
    Inspect { file: PathBuf },
    /// Ask a plugin about one described request, under the gateway's
    /// sandbox and limits; print its decision and the call time. Fails when
    /// the request file's `expect` does not match.
    Test {
        file: PathBuf,
        /// A TOML file describing the request (and `expect`).
        #[arg(long)]
        request: PathBuf,
        /// The plugin's settings (default: the NAME.toml beside the file).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("WASMGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never into a file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { config } => run(config).await,
            Command::Check { config } => check(config).await,
            Command::Reload { admin, token_file } => reload(admin, token_file).await,
            Command::Plugin { command: PluginCommand::Inspect { file } } => inspect(file).await,
            Command::Plugin { command: PluginCommand::Test { file, request, config } } => {
                plugin_test(file, request, config).await
            }
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

async fn run(path: PathBuf) -> anyhow::Result<()> {
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

async fn plugin_test(file: PathBuf, request: PathBuf, config: Option<PathBuf>) -> anyhow::Result<()> {
    let report = wasmgate::control::plugin_test::run(&file, &request, config.as_deref()).await?;
    print!("{}", report.text);
    if report.passed { Ok(()) } else { anyhow::bail!("{}: the decision is not the expected one", request.display()) }
}
