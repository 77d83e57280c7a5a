//! `wasmgate plugin inspect FILE.wasm`: what a component is, what it imports
//! and exports, and whether the gateway would accept it (and why not).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use wasmtime::component::Component;

use super::cache::ArtifactCache;
use super::host_api::{HostServices, PluginContext};
use super::loaded::{LoadedPlugin, PluginLimits, PluginSource, Pre};
use super::registry::hex;
use super::runtime::Runtime;
use crate::config::{PluginKind, PluginSettings, PluginsConfig};
use crate::counting::Counters;

/// The findings about one file.
pub struct Inspection {
    pub file: String,
    pub size: usize,
    pub sha256: String,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    /// The world it implements, when its exports say.
    pub world: Option<&'static str>,
    /// `None` if accepted, else the reason.
    pub rejection: Option<String>,
}

impl Inspection {
    pub fn accepted(&self) -> bool {
        self.rejection.is_none()
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "file:    {} ({} bytes)", self.file, self.size)?;
        writeln!(f, "sha256:  {}", self.sha256)?;
        writeln!(f, "world:   {}", self.world.unwrap_or("none (no wasmgate:plugin export)"))?;
        writeln!(f, "imports:")?;
        for import in &self.imports {
            writeln!(f, "  {import}")?;
        }
        writeln!(f, "exports:")?;
        for export in &self.exports {
            writeln!(f, "  {export}")?;
        }
        match &self.rejection {
            None => writeln!(
                f,
                "verdict: accepted (compiled, linked, instantiated and initialised with the default limits and the NAME.toml beside it)"
            ),
            Some(reason) => writeln!(f, "verdict: rejected: {reason}"),
        }
    }
}

/// Compiles, links and instantiates `file` as the gateway would.
pub async fn inspect(file: &Path) -> anyhow::Result<Inspection> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let runtime = Arc::new(Runtime::new()?);
    let mut inspection = Inspection {
        file: file.display().to_string(),
        size: bytes.len(),
        sha256: hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
        imports: Vec::new(),
        exports: Vec::new(),
        world: None,
        rejection: None,
    };
    // Through the compiled-artifact cache, as the gateway loads it: a big
    // component is compiled once for `inspect`, `plugin test` and the gateway.
    let cache = ArtifactCache::default_dir().and_then(|dir| ArtifactCache::open(&dir, runtime.engine()).ok());
    let compiled = match cache.as_ref().and_then(|cache| cache.get(runtime.engine(), &inspection.sha256)) {
        Some(component) => Ok(component),
        None => Component::from_binary(runtime.engine(), &bytes).inspect(|component| {
            if let Some(cache) = &cache {
                cache.put(&inspection.sha256, component);
            }
        }),
    };
    let component = match compiled {
        Ok(component) => component,
        Err(error) => {
            inspection.rejection = Some(format!("not a valid WebAssembly component: {error:#}"));
            return Ok(inspection);
        }
    };
    let ty = component.component_type();
    inspection.imports = ty.imports(runtime.engine()).map(|(name, _)| name.to_owned()).collect();
    inspection.exports = ty.exports(runtime.engine()).map(|(name, _)| name.to_owned()).collect();
    match Pre::new(&runtime, &component) {
        Ok(pre) => {
            inspection.world = Some(match pre.kind() {
                PluginKind::Router => "wasmgate:plugin/router-plugin",
                PluginKind::Waf => "wasmgate:plugin/waf-plugin",
            })
        }
        Err(error) => {
            // Which world its exports claim, for the reader, though it does not link.
            let claims =
                |world: &str| inspection.exports.iter().any(|e| e.starts_with(&format!("wasmgate:plugin/{world}@")));
            inspection.world = match (claims("router"), claims("waf")) {
                (true, false) => Some("wasmgate:plugin/router-plugin (claimed by its exports; it does not link)"),
                (false, true) => Some("wasmgate:plugin/waf-plugin (claimed by its exports; it does not link)"),
                _ => None,
            };
            inspection.rejection = Some(format!("{error:#}"));
            return Ok(inspection);
        }
    }
    // Its `init` sees the settings it would be loaded with.
    let settings = match PluginSettings::load(&file.with_extension("toml")) {
        Ok((settings, _)) => settings,
        Err(error) => {
            inspection.rejection = Some(format!("{error:#}"));
            return Ok(inspection);
        }
    };
    let limits = PluginLimits::new(&PluginsConfig::default(), &settings);
    let services = Arc::new(HostServices { counters: Counters::default(), pools: Default::default() });
    let name = file.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin").to_owned();
    let context = Arc::new(PluginContext::new(name, settings.config, services));
    let source =
        PluginSource { sha256: inspection.sha256.clone(), source_hash: String::new(), version: 0, from_cache: false };
    let started = tokio::task::spawn_blocking(move || LoadedPlugin::new(runtime, component, source, context, limits))
        .await
        .context("plugin start-up task failed")?;
    if let Err(error) = started {
        inspection.rejection = Some(format!("{error:#}"));
    }
    Ok(inspection)
}
