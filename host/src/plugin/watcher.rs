//! Watches the plugin directory and reconciles the registry with it: drop a
//! `NAME.wasm` (or change its `NAME.toml`) and the gateway's behaviour changes
//! without a restart.
//!
//! File events are debounced (a copy or an editor's save is many events) and
//! then the whole directory is reconciled, so renames, partial writes and
//! deletions all end the same way: what is in the directory and valid is
//! what serves. A file still being written fails to compile, is rejected,
//! and is loaded by the reconcile its final write triggers.

use std::sync::Arc;

use super::registry::{Loader, Registry};
use crate::file_watch::{self, FileWatch};

/// Starts watching `loader`'s directory for `registry`; dropping the watch
/// stops it.
pub fn watch(registry: Arc<Registry>, loader: Arc<Loader>) -> notify::Result<FileWatch> {
    let dir = loader.dir().to_owned();
    let watch = file_watch::watch(
        "plugin directory",
        std::slice::from_ref(&dir),
        |_| true,
        move || {
            let (registry, loader) = (registry.clone(), loader.clone());
            async move {
                let report = registry.reconcile(&loader).await;
                tracing::debug!(?report, "plugin directory reconciled");
            }
        },
    )?;
    tracing::info!(dir = %dir.display(), "watching the plugin directory");
    Ok(watch)
}
