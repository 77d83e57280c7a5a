//! The compiled-artifact cache: components compiled once are serialized to
//! `cache_dir` under their content hash and this engine's compatibility hash,
//! so a restart (or a swap back to an earlier version) with unchanged files
//! loads machine code in well under a millisecond instead of recompiling.
//!
//! The cache directory must be trusted: wasmtime runs the machine code it
//! finds there. It is created private to the gateway's user (mode 0700), and
//! an existing directory that another user owns or others can write to is
//! not used at all. Each artifact also carries an HMAC-SHA256 of its bytes
//! under a key derived from its file name and a random key made once in the
//! directory (`key`, mode 0600): a file changed, truncated, swapped for another
//! component's or written by anything but this cache is recompiled, never
//! run. The whole file is read and checked before wasmtime sees it, so what
//! was checked is what runs.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ring::hmac;
use wasmtime::Engine;
use wasmtime::component::Component;

/// Bytes of the HMAC-SHA256 tag at the end of each artifact.
const TAG_LEN: usize = 32;

/// A name for a scratch file no other writer in this process or another
/// one picks at the same time.
fn scratch_name(what: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(".{what}.{}.{}.tmp", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Serialized components by content hash.
pub struct ArtifactCache {
    dir: PathBuf,
    compatibility: u64,
    /// Authenticates the artifacts (see the module's comment).
    key: hmac::Key,
    /// The most the cache's artifacts may take on disk; the least recently
    /// used go first past it.
    max_bytes: u64,
}

/// The cache's default size bound (`[plugins] cache_max_mb`).
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

impl ArtifactCache {
    /// Opens (creating if needed) the cache at `dir`, if it is private to
    /// this user.
    pub fn open(dir: &Path, engine: &Engine) -> std::io::Result<ArtifactCache> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        check_private(dir)?;
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let key = hmac::Key::new(hmac::HMAC_SHA256, &load_or_make_key(dir)?);
        Ok(ArtifactCache { dir: dir.to_owned(), compatibility: hasher.finish(), key, max_bytes: DEFAULT_MAX_BYTES })
    }

    /// The same cache, bounded to `max_bytes` on disk.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> ArtifactCache {
        self.max_bytes = max_bytes;
        self
    }

    /// The default location: `$XDG_CACHE_HOME/wasmgate` or
    /// `~/.cache/wasmgate`; none without either (no shared temp directory).
    pub fn default_dir() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            return Some(PathBuf::from(dir).join("wasmgate"));
        }
        std::env::var_os("HOME").filter(|d| !d.is_empty()).map(|home| PathBuf::from(home).join(".cache/wasmgate"))
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{:016x}.cwasm", self.compatibility))
    }

    /// The cached component for `sha256`, if a usable one is there.
    pub fn get(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        let path = self.path(sha256);
        let mut bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "unreadable cached artifact; recompiling");
                return None;
            }
        };
        if !self.authentic(&path, &mut bytes) {
            tracing::warn!(file = %path.display(), "cached artifact fails its integrity check (changed or not written by this cache); recompiling");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        // SAFETY: these bytes carry this cache's HMAC, so this code
        // serialized them; wasmtime still checks the header and the engine
        // compatibility before using them.
        match unsafe { Component::deserialize(engine, &bytes) } {
            Ok(component) => {
                // Used now: the last to go when the cache is pruned.
                let _ = std::fs::File::open(&path).and_then(|f| f.set_modified(std::time::SystemTime::now()));
                Some(component)
            }
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "unusable cached artifact; recompiling");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// The key an artifact stored at `path` is tagged with: the cache's key
    /// and the file's name, so an artifact renamed to another component's
    /// name fails (and the artifact is hashed in place, never copied).
    fn key_for(&self, path: &Path) -> hmac::Key {
        let name = path.file_name().map_or(&[][..], |n| n.as_encoded_bytes());
        hmac::Key::new(hmac::HMAC_SHA256, hmac::sign(&self.key, name).as_ref())
    }

    /// Whether `file` (artifact then tag) carries this cache's tag; `file`
    /// is left holding the artifact alone.
    fn authentic(&self, path: &Path, file: &mut Vec<u8>) -> bool {
        let Some(split) = file.len().checked_sub(TAG_LEN) else { return false };
        let tag: [u8; TAG_LEN] = file[split..].try_into().unwrap_or([0; TAG_LEN]);
        file.truncate(split);
        hmac::verify(&self.key_for(path), file, &tag).is_ok()
    }

    /// Stores `component` for `sha256` (atomically: write, then rename).
    pub fn put(&self, sha256: &str, component: &Component) {
        let path = self.path(sha256);
        let temp = self.dir.join(scratch_name(sha256));
        let result = component
            .serialize()
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|mut bytes| {
                let tag = hmac::sign(&self.key_for(&path), &bytes);
                bytes.extend_from_slice(tag.as_ref());
                // create_new: never follow or reuse a file someone else put there.
                let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
                std::io::Write::write_all(&mut file, &bytes)
            })
            .and_then(|()| std::fs::rename(&temp, &path));
        if let Err(error) = result {
            let _ = std::fs::remove_file(&temp);
            tracing::warn!(dir = %self.dir.display(), %error, "could not write the compiled-artifact cache");
        }
        self.prune();
    }

    /// Removes the least recently used artifacts until the cache fits its
    /// bound (the newest always stays).
    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let mut artifacts: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .filter_map(|e| {
                let meta = e.metadata().ok().filter(|m| m.is_file())?;
                Some((meta.modified().ok()?, meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = artifacts.iter().map(|(_, len, _)| len).sum();
        artifacts.sort();
        let newest = artifacts.pop();
        for (_, len, path) in artifacts {
            if total <= self.max_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
                tracing::debug!(file = %path.display(), "compiled-artifact cache pruned");
            }
        }
        drop(newest);
    }
}

/// The cache's HMAC key: `DIR/key`, made once from the system's secure
/// random source. Several gateways sharing the directory agree on one key:
/// a new key is written aside and linked into place, and whoever loses the
/// race reads the winner's.
fn load_or_make_key(dir: &Path) -> std::io::Result<[u8; TAG_LEN]> {
    let path = dir.join("key");
    let read = |path: &Path| -> std::io::Result<[u8; TAG_LEN]> {
        let meta = std::fs::symlink_metadata(path)?;
        if !meta.is_file() || meta.mode() & 0o077 != 0 {
            return Err(std::io::Error::other(format!("{} is not a private file (mode 0600)", path.display())));
        }
        std::fs::read(path)?
            .try_into()
            .map_err(|_| std::io::Error::other(format!("{} is not a {TAG_LEN}-byte key", path.display())))
    };
    match read(&path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        other => return other,
    }
    let mut key = [0u8; TAG_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| std::io::Error::other("no secure random source"))?;
    let temp = dir.join(scratch_name("key"));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut file| std::io::Write::write_all(&mut file, &key))
        .and_then(|()| std::fs::hard_link(&temp, &path));
    let _ = std::fs::remove_file(&temp);
    match written {
        Ok(()) => Ok(key),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => read(&path),
        Err(error) => Err(error),
    }
}

/// Refuses a directory that is not owned by this process's user or that
/// other users can write to.
fn check_private(dir: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("not a directory (or a symlink)"));
    }
    // A file made now is owned by this process's effective user.
    let probe = dir.join(scratch_name("owner-check"));
    let me = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&probe)?.metadata()?.uid();
    let _ = std::fs::remove_file(&probe);
    if meta.uid() != me {
        return Err(std::io::Error::other("owned by another user"));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(std::io::Error::other("writable by other users (chmod 700 it)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn engine() -> Engine {
        Engine::new(&wasmtime::Config::new()).unwrap()
    }

    #[test]
    fn past_its_bound_the_least_recently_used_artifacts_go() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path(), &engine()).unwrap().with_max_bytes(2500);
        let now = std::time::SystemTime::now();
        for (i, age) in [30u64, 10, 20, 0].into_iter().enumerate() {
            let path = dir.path().join(format!("artifact-{i}.cwasm"));
            std::fs::write(&path, vec![0u8; 1000]).unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(now - std::time::Duration::from_secs(age)).unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), vec![0u8; 5000]).unwrap();
        cache.prune();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        // 4,000 bytes of artifacts, 2,500 allowed: the two oldest (30 s and
        // 20 s) go; other files (and the key) are not pruned.
        assert_eq!(left, ["artifact-1.cwasm", "artifact-3.cwasm", "key", "notes.txt"]);
    }

    #[test]
    fn a_new_cache_directory_is_private() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("cache");
        ArtifactCache::open(&dir, &engine()).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn the_key_is_made_once_private_and_a_readable_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_make_key(dir.path()).unwrap();
        assert_eq!(load_or_make_key(dir.path()).unwrap(), first, "kept");
        let key = dir.path().join("key");
        assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = load_or_make_key(dir.path()).unwrap_err();
        assert!(error.to_string().contains("not a private file"), "{error}");
        let other = tempfile::tempdir().unwrap();
        assert_ne!(load_or_make_key(other.path()).unwrap(), first, "random per directory");
    }

    #[test]
    fn a_directory_others_can_write_to_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = ArtifactCache::open(dir.path(), &engine()).err().expect("refused");
        assert!(error.to_string().contains("writable by other users"), "{error}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(ArtifactCache::open(dir.path(), &engine()).is_ok(), "only group/other write is refused");
    }

    #[test]
    fn a_symlink_is_not_used() {
        let parent = tempfile::tempdir().unwrap();
        let real = parent.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = parent.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let error = ArtifactCache::open(&link, &engine()).err().expect("refused");
        assert!(error.to_string().contains("symlink"), "{error}");
    }

    #[test]
    fn a_directory_another_user_owns_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        // Giving the directory away needs root (CI runs as root); as another
        // user there is no way to make one this process does not own.
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
            let error = ArtifactCache::open(dir.path(), &engine()).err().expect("refused");
            assert!(error.to_string().contains("owned by another user"), "{error}");
        } else {
            let error = ArtifactCache::open(Path::new("/"), &engine()).err().expect("refused");
            assert!(error.to_string().contains("another user") || error.kind() == std::io::ErrorKind::PermissionDenied);
        }
    }
}
