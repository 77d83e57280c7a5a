//! Watching files for changes: the plugin directory and certificate files,
//! whether they are written in place or swapped the Kubernetes way.
//!
//! Events are debounced (a copy or an editor's save is many events) and the
//! gateway's own reads are not changes: a write (a file closed after
//! writing, a create, a rename, a removal) is.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Whether `path` is Kubernetes' `..data` link: a ConfigMap or Secret
/// volume is updated by pointing `..data` at a new directory in one rename,
/// while the files the gateway was told about (`tls.crt -> ..data/tls.crt`)
/// never change themselves; only this rename says they now read anew.
pub fn is_kubernetes_swap(path: &Path) -> bool {
    path.file_name().is_some_and(|name| name == "..data")
}

/// Quiet time after the last file event before acting on it.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// A running watch; dropping it stops watching.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
    task: JoinHandle<()>,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watches `dirs` (not recursively) and runs `on_change` once the events on
/// paths `relevant` accepts have been quiet for [`DEBOUNCE`]. `what` names
/// the watch in logs.
pub fn watch<F, Fut>(
    what: &'static str,
    dirs: &[PathBuf],
    relevant: impl Fn(&Path) -> bool + Send + 'static,
    mut on_change: F,
) -> notify::Result<FileWatch>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        use notify::EventKind::Access;
        use notify::event::{AccessKind, AccessMode};
        match event {
            Ok(event)
                if (!matches!(event.kind, Access(_))
                    || matches!(event.kind, Access(AccessKind::Close(AccessMode::Write))))
                    && event.paths.iter().any(|p| relevant(p)) =>
            {
                let _ = tx.send(());
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "{what}: file watch error"),
        }
    })?;
    for dir in dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    let task = tokio::spawn(async move {
        while rx.recv().await.is_some() {
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
            on_change().await;
        }
    });
    Ok(FileWatch { _watcher: watcher, task })
}
