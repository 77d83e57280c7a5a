//! The plugin registry: every loaded plugin by name, and the loader that
//! turns the plugin directory into it.
//!
//! The whole name→plugin map sits behind one `ArcSwap`, so a lookup on the
//! request path is a lock-free load, and replacing a plugin is one pointer
//! swap. A request holds the `Arc<LoadedPlugin>` it started with, so a swap
//! never changes a call under way, and upgraded WebSockets hold no plugin at
//! all.
//!
//! [`Registry::reconcile`] makes the map match the directory: new and changed
//! files (component or `NAME.toml`) are compiled off the async workers,
//! instantiated once and swapped in; a file that fails any step is rejected
//! with its reason while the previous version keeps serving; a removed file
//! unloads its plugin.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::{ArcSwap, ArcSwapOption};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::breaker::BreakerLimits;
use super::cache::ArtifactCache;
use super::host_api::{HostServices, PluginContext};
use super::loaded::{LoadedPlugin, PluginLimits, PluginSource};
use super::runtime::Runtime;
use crate::config::{Config, OnError, PluginKind, PluginSettings, PluginsConfig};

/// A plugin file that could not be loaded, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub file: PathBuf,
    pub reason: String,
}

/// What one [`Registry::reconcile`] changed.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    pub loaded: Vec<String>,
    pub unloaded: Vec<String>,
    pub rejected: Vec<Rejected>,
}

/// Compiles plugin files into [`LoadedPlugin`]s.
pub struct Loader {
    runtime: Arc<Runtime>,
    defaults: PluginsConfig,
    services: Arc<HostServices>,
    cache: Option<ArtifactCache>,
    /// The role each plugin is used in by the config, and the key saying so.
    roles: ArcSwap<HashMap<String, (PluginKind, String)>>,
}

impl Loader {
    pub fn new(
        runtime: Arc<Runtime>,
        defaults: PluginsConfig,
        services: Arc<HostServices>,
        roles: HashMap<String, (PluginKind, String)>,
    ) -> Loader {
        let cache_dir = defaults.cache_dir.clone().or_else(ArtifactCache::default_dir);
        let cache = match (defaults.cache, cache_dir) {
            (false, _) => None,
            (true, None) => {
                tracing::warn!("no cache_dir, XDG_CACHE_HOME or HOME: compiled-artifact cache off");
                None
            }
            (true, Some(dir)) => match ArtifactCache::open(&dir, runtime.engine()) {
                Ok(cache) => Some(cache.with_max_bytes(defaults.cache_max_mb << 20)),
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "compiled-artifact cache unusable; compiling every load");
                    None
                }
            },
        };
        Loader { runtime, defaults, services, cache, roles: ArcSwap::from_pointee(roles) }
    }

    /// The roles of a reloaded config, for the loads from now on.
    pub fn set_roles(&self, roles: HashMap<String, (PluginKind, String)>) {
        self.roles.store(Arc::new(roles));
    }

    pub fn dir(&self) -> &Path {
        &self.defaults.dir
    }

    /// Compiles (or takes from the cache) and validates one plugin file with
    /// its `NAME.toml` beside it.
    pub async fn load(&self, file: &Path, version: u64) -> anyhow::Result<LoadedPlugin> {
        let name = plugin_name(file)?;
        // Each file is read once: what is hashed is exactly what is used.
        let (settings, settings_bytes) = PluginSettings::load(&file.with_extension("toml"))?;
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let sha256 = hex(&Sha256::digest(&bytes));
        let source_hash = source_hash(&bytes, &settings_bytes);

        let (component, from_cache) = match self.cache.as_ref().and_then(|c| c.get(self.runtime.engine(), &sha256)) {
            Some(component) => (component, true),
            None => {
                // A JS or Python component takes seconds: say so, or a
                // start-up that waits on it looks hung.
                tracing::info!(plugin = %name, bytes = bytes.len(), "compiling plugin (not in the compiled-artifact cache)");
                // Compiling takes milliseconds to seconds: keep it off the async workers.
                let engine = self.runtime.engine().clone();
                let component = tokio::task::spawn_blocking(move || Component::from_binary(&engine, &bytes))
                    .await
                    .context("compiler task failed")?
                    .map_err(anyhow::Error::from)
                    .context("not a valid WebAssembly component")?;
                if let Some(cache) = &self.cache {
                    cache.put(&sha256, &component);
                }
                (component, false)
            }
        };

        let limits = PluginLimits::new(&self.defaults, &settings);
        let context = Arc::new(PluginContext::new(name.clone(), settings.config, self.services.clone()));
        let source = PluginSource { sha256, source_hash, version, from_cache };
        // Start-up (instantiation and the plugin's `init`) runs guest code
        // for up to a second: off the async workers too.
        let runtime = self.runtime.clone();
        let plugin =
            tokio::task::spawn_blocking(move || LoadedPlugin::new(runtime, component, source, context, limits))
                .await
                .context("plugin start-up task failed")??;
        if let Some((role, key)) = self.roles.load().get(&name)
            && plugin.kind != *role
        {
            anyhow::bail!("this component is a {} plugin, but `{key}` uses `{name}` as a {role}", plugin.kind);
        }
        Ok(plugin)
    }
}

impl PluginLimits {
    /// The `[plugins]` defaults, overridden by a plugin's `NAME.toml`.
    pub fn new(defaults: &PluginsConfig, settings: &PluginSettings) -> PluginLimits {
        PluginLimits {
            call_timeout: Duration::from_millis(settings.call_timeout_ms.unwrap_or(defaults.call_timeout_ms)),
            memory_limit_bytes: (settings.memory_limit_mb.unwrap_or(defaults.memory_limit_mb) as usize) << 20,
            on_error: settings.on_error.unwrap_or(defaults.on_error),
            breaker: BreakerLimits {
                quarantine_after_failures: defaults.quarantine_after_failures,
                quarantine_initial: Duration::from_millis(defaults.quarantine_initial_ms),
                quarantine_max: Duration::from_millis(defaults.quarantine_max_ms),
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct History {
    version: u64,
    on_error: OnError,
}

/// The version of one plugin name in force: held by every listener whose
/// rules name the plugin, so a request reads it without a lookup by name,
/// and updated by every reconcile that loads or unloads the name.
pub type PluginSlot = ArcSwapOption<LoadedPlugin>;

/// Loaded plugins by name.
pub struct Registry {
    plugins: ArcSwap<HashMap<String, Arc<LoadedPlugin>>>,
    /// The slot of every name some listener's rules asked for.
    slots: Mutex<HashMap<String, Arc<PluginSlot>>>,
    /// The latest refusal of each file that is not loaded as it is now, by
    /// plugin name (cleared once the file loads, or goes).
    rejected: Mutex<HashMap<String, Rejected>>,
    /// Last version number and failure policy of every name ever loaded.
    history: Mutex<HashMap<String, History>>,
    /// Only one reconcile at a time.
    reconciling: tokio::sync::Mutex<()>,
    /// Reconciles completed so far.
    reconciles: AtomicU64,
    default_on_error: OnError,
}

impl Registry {
    pub fn new(default_on_error: OnError) -> Registry {
        Registry {
            plugins: ArcSwap::from_pointee(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            rejected: Mutex::new(HashMap::new()),
            history: Mutex::new(HashMap::new()),
            reconciling: tokio::sync::Mutex::new(()),
            reconciles: AtomicU64::new(0),
            default_on_error,
        }
    }

    /// The current version of plugin `name`.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.plugins.load().get(name).cloned()
    }

    /// The slot of plugin `name`: its current version now and after every
    /// swap (empty while it is not loaded).
    pub fn slot(&self, name: &str) -> Arc<PluginSlot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        // Read under the lock: a reconcile updates the slots under it too.
        slots.entry(name.to_owned()).or_insert_with(|| Arc::new(ArcSwapOption::new(self.get(name)))).clone()
    }

    /// Every loaded plugin, sorted by name.
    pub fn all(&self) -> Vec<Arc<LoadedPlugin>> {
        let mut all: Vec<_> = self.plugins.load().values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Files in the plugin directory that were refused, with why, sorted by
    /// plugin name. A file stays listed until it loads or is removed.
    pub fn rejected(&self) -> Vec<(String, Rejected)> {
        let rejected = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = rejected.iter().map(|(name, r)| (name.clone(), r.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// How many times the directory has been reconciled.
    pub fn reconciles(&self) -> u64 {
        self.reconciles.load(Ordering::Acquire)
    }

    /// The failure policy for a plugin that is named but not loaded: its last
    /// loaded version's, or the `[plugins]` default.
    pub fn missing_policy(&self, name: &str) -> OnError {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.get(name).map_or(self.default_on_error, |h| h.on_error)
    }

    /// Checks that every plugin `config` names is loaded, with the kind the
    /// config uses it as.
    pub fn check_roles(&self, config: &Config) -> Result<(), String> {
        for (name, key, role) in config.referenced_plugins() {
            match self.get(&name) {
                None => {
                    // Say why, when its file is there but was refused.
                    let why = match self.rejected.lock().unwrap_or_else(|p| p.into_inner()).get(&name) {
                        Some(rejected) => format!("{} was refused: {}", rejected.file.display(), rejected.reason),
                        None if config.plugins.dir.join(format!("{name}.wasm")).is_file() => format!(
                            "{name}.wasm is still loading; reload again once the log says `plugin loaded` for it"
                        ),
                        None => format!("no valid {name}.wasm in {}", config.plugins.dir.display()),
                    };
                    return Err(format!("{}: `{key}`: plugin `{name}` is not loaded ({why})", config.source.display()));
                }
                Some(plugin) if plugin.kind != role => {
                    return Err(format!(
                        "{}: `{key}`: plugin `{name}` is a {} plugin, not a {role}",
                        config.source.display(),
                        plugin.kind
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Makes the registry match the plugin directory.
    pub async fn reconcile(&self, loader: &Loader) -> ReconcileReport {
        let _one_at_a_time = self.reconciling.lock().await;
        let mut report = ReconcileReport::default();
        let dir = loader.dir();
        let files = match wasm_files(dir) {
            Ok(files) => files,
            Err(error) => {
                tracing::error!(dir = %dir.display(), %error, "cannot read the plugin directory; plugins unchanged");
                self.reconciles.fetch_add(1, Ordering::Release);
                return report;
            }
        };
        let current = self.plugins.load_full();
        let mut next: HashMap<String, Arc<LoadedPlugin>> = HashMap::new();
        for file in &files {
            let Ok(name) = plugin_name(file) else { continue };
            let old = current.get(&name);
            if let Some(old) = old
                && std::fs::read(file).is_ok_and(|bytes| {
                    let settings = std::fs::read(file.with_extension("toml")).unwrap_or_default();
                    source_hash(&bytes, &settings) == old.source_hash
                })
            {
                // What is on disk is what serves: an earlier refusal is over.
                self.rejected.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
                next.insert(name, old.clone());
                continue;
            }
            let version =
                self.history.lock().unwrap_or_else(|p| p.into_inner()).get(&name).map_or(1, |h| h.version + 1);
            match loader.load(file, version).await {
                Ok(plugin) => {
                    let id = &plugin.identity;
                    tracing::info!(
                        plugin = %id.name,
                        kind = %id.kind,
                        version = id.version,
                        sha256 = %id.sha256,
                        from_cache = id.from_cache,
                        timeout_ms = plugin.limits.call_timeout.as_millis() as u64,
                        memory_limit_mb = plugin.limits.memory_limit_bytes >> 20,
                        on_error = ?plugin.limits.on_error,
                        "plugin loaded"
                    );
                    self.history
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.clone(), History { version, on_error: plugin.limits.on_error });
                    report.loaded.push(name.clone());
                    self.rejected.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
                    next.insert(name, Arc::new(plugin));
                }
                Err(err) => {
                    let reason = format!("{err:#}");
                    match old {
                        Some(old) => {
                            tracing::error!(file = %file.display(), %reason, serving_version = old.identity.version, "plugin rejected; the previous version keeps serving");
                        }
                        None => tracing::error!(file = %file.display(), %reason, "plugin rejected"),
                    }
                    let rejected = Rejected { file: file.clone(), reason };
                    self.rejected.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone(), rejected.clone());
                    report.rejected.push(rejected);
                    if let Some(old) = old {
                        next.insert(name, old.clone());
                    }
                }
            }
        }
        for (name, old) in current.iter() {
            if !next.contains_key(name) {
                tracing::warn!(
                    plugin = %name,
                    version = old.identity.version,
                    sha256 = %old.identity.sha256,
                    on_error = ?old.limits.on_error,
                    "plugin unloaded (its file is gone); listeners naming it follow its on_error policy"
                );
                report.unloaded.push(name.clone());
            }
        }
        if !report.loaded.is_empty() || !report.unloaded.is_empty() {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            for (name, slot) in slots.iter() {
                slot.store(next.get(name).cloned());
            }
            self.plugins.store(Arc::new(next));
        }
        let on_disk: std::collections::HashSet<String> = files.iter().filter_map(|f| plugin_name(f).ok()).collect();
        self.rejected.lock().unwrap_or_else(|p| p.into_inner()).retain(|name, _| on_disk.contains(name));
        self.reconciles.fetch_add(1, Ordering::Release);
        report
    }
}

/// `NAME.wasm` files of `dir`, sorted; hidden files (editors' and tools'
/// temporaries) are skipped. A missing directory has none.
fn wasm_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "wasm"))
        .filter(|path| path.file_name().and_then(|n| n.to_str()).is_some_and(|n| !n.starts_with('.')))
        .collect();
    files.sort();
    Ok(files)
}

fn plugin_name(file: &Path) -> anyhow::Result<String> {
    file.file_stem()
        .and_then(|stem| stem.to_str())
        .filter(|stem| !stem.is_empty())
        .map(str::to_owned)
        .with_context(|| format!("{}: a plugin file needs a UTF-8 name", file.display()))
}

/// What decides whether a plugin changed: its component and its settings.
fn source_hash(component: &[u8], settings: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(component);
    hasher.update(settings);
    hex(&hasher.finalize())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
