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
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::registry::{Loader, Registry};

/// Quiet time after the last file event before reconciling.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// A running watch; dropping it stops watching.
pub struct Watcher {
    _watcher: notify::RecommendedWatcher,
    task: JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts watching `loader`'s directory for `registry`.
pub fn watch(registry: Arc<Registry>, loader: Arc<Loader>) -> notify::Result<Watcher> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        use notify::EventKind::Access;
        use notify::event::{AccessKind, AccessMode};
        match event {
            // A file closed after writing is a change; every other access
            // (the reconcile's own reads among them) is not.
            Ok(event) if matches!(event.kind, Access(AccessKind::Close(AccessMode::Write))) => {
                let _ = tx.send(());
            }
            Ok(event) if matches!(event.kind, Access(_)) => {}
            Ok(_) => {
                let _ = tx.send(());
            }
            Err(error) => tracing::warn!(%error, "plugin directory watch error"),
        }
    })?;
    watcher.watch(loader.dir(), RecursiveMode::NonRecursive)?;
    tracing::info!(dir = %loader.dir().display(), "watching the plugin directory");
    let task = tokio::spawn(async move {
        while rx.recv().await.is_some() {
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
            let report = registry.reconcile(&loader).await;
            tracing::debug!(?report, "plugin directory reconciled");
        }
    });
    Ok(Watcher { _watcher: watcher, task })
}
