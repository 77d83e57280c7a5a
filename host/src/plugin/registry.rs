//! The plugin registry: every loaded plugin by name.
//!
//! The whole name→plugin map sits behind one `ArcSwap`, so a lookup on the
//! request path is a lock-free load, and replacing a plugin (or all of them)
//! is one pointer swap. A request holds the `Arc<LoadedPlugin>` it started
//! with, so a swap never changes a call under way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::host_api::{HostServices, PluginContext};
use super::loaded::{LoadedPlugin, PluginLimits};
use super::runtime::Runtime;
use crate::config::{PluginSettings, PluginsConfig};

/// Loaded plugins by name.
pub struct Registry {
    plugins: ArcSwap<HashMap<String, Arc<LoadedPlugin>>>,
}

/// A plugin file that could not be loaded, and why.
#[derive(Debug)]
pub struct Rejected {
    pub file: PathBuf,
    pub reason: String,
}

impl Registry {
    /// Loads every `NAME.wasm` in `config.dir`. Files that fail are returned
    /// as rejected (with the reason) rather than failing the whole load, so
    /// the caller decides whether that plugin matters.
    pub async fn load_dir(
        runtime: &Arc<Runtime>,
        config: &PluginsConfig,
        services: &Arc<HostServices>,
    ) -> anyhow::Result<(Registry, Vec<Rejected>)> {
        let mut plugins = HashMap::new();
        let mut rejected = Vec::new();
        let entries = match std::fs::read_dir(&config.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(dir = %config.dir.display(), "plugin directory does not exist; no plugins loaded");
                return Ok((Registry::from_map(plugins), rejected));
            }
            Err(e) => return Err(e).with_context(|| format!("reading plugin directory {}", config.dir.display())),
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "wasm"))
            .collect();
        files.sort();
        for file in files {
            match load_plugin(runtime, &file, config, services).await {
                Ok(plugin) => {
                    tracing::info!(
                        plugin = %plugin.name,
                        kind = %plugin.kind,
                        sha256 = %&plugin.sha256[..16],
                        timeout_ms = plugin.limits.call_timeout.as_millis() as u64,
                        memory_limit_mb = plugin.limits.memory_limit_bytes >> 20,
                        "plugin loaded"
                    );
                    plugins.insert(plugin.name.clone(), Arc::new(plugin));
                }
                Err(err) => {
                    let reason = format!("{err:#}");
                    tracing::error!(file = %file.display(), %reason, "plugin rejected");
                    rejected.push(Rejected { file, reason });
                }
            }
        }
        Ok((Registry::from_map(plugins), rejected))
    }

    fn from_map(plugins: HashMap<String, Arc<LoadedPlugin>>) -> Registry {
        Registry { plugins: ArcSwap::from_pointee(plugins) }
    }

    /// The current version of plugin `name`.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.plugins.load().get(name).cloned()
    }

    /// Every loaded plugin, sorted by name.
    pub fn all(&self) -> Vec<Arc<LoadedPlugin>> {
        let mut all: Vec<_> = self.plugins.load().values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

/// Compiles and validates one plugin file with its `NAME.toml` beside it.
pub async fn load_plugin(
    runtime: &Arc<Runtime>,
    file: &Path,
    defaults: &PluginsConfig,
    services: &Arc<HostServices>,
) -> anyhow::Result<LoadedPlugin> {
    let name = file
        .file_stem()
        .and_then(|stem| stem.to_str())
        .filter(|stem| !stem.is_empty())
        .with_context(|| format!("{}: a plugin file needs a UTF-8 name", file.display()))?
        .to_owned();
    let settings = PluginSettings::load(&file.with_extension("toml"))?;
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let sha256 = hex(&Sha256::digest(&bytes));

    // Compiling takes milliseconds to seconds: keep it off the async workers.
    let engine = runtime.engine().clone();
    let component = tokio::task::spawn_blocking(move || Component::from_binary(&engine, &bytes))
        .await
        .context("compiler task failed")?
        .map_err(anyhow::Error::from)
        .with_context(|| format!("{}: not a valid WebAssembly component", file.display()))?;

    let limits = PluginLimits {
        call_timeout: Duration::from_millis(settings.call_timeout_ms.unwrap_or(defaults.call_timeout_ms)),
        memory_limit_bytes: (settings.memory_limit_mb.unwrap_or(defaults.memory_limit_mb) as usize) << 20,
        on_error: settings.on_error.unwrap_or(defaults.on_error),
    };
    let context = Arc::new(PluginContext { name, config: settings.config, services: services.clone() });
    LoadedPlugin::new(runtime.clone(), component, sha256, context, limits)
        .await
        .with_context(|| format!("{}", file.display()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
