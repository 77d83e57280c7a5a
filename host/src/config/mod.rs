//! The gateway's configuration: the TOML file given to `wasmgate run`, and the
//! `NAME.toml` file beside each plugin. Imports nothing of the gateway.
//!
//! [`schema`] holds the tables and their defaults; [`validate`] the checks
//! beyond types. Every table refuses unknown keys, and [`Config::load`]
//! validates the whole file (references between listeners, pools and
//! plugins included) before anything is started, naming the file, the line,
//! the key and the reason on failure.

mod schema;
mod validate;

use std::path::{Path, PathBuf};

pub use schema::*;

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    /// TOML syntax or a wrong type/unknown key; the message has line and column.
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    /// The file parsed but a value is not usable; `line` is where the key
    /// is written (none for a default value).
    #[error("{file}{}: `{key}`: {reason}", .line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid { file: PathBuf, line: Option<usize>, key: String, reason: String },
}

impl ConfigError {
    /// Adds the line of the offending key in `text` (the file's contents).
    fn with_line(self, text: &str) -> ConfigError {
        match self {
            ConfigError::Invalid { file, line: None, key, reason } => {
                let line = line_of_key(text, &key);
                ConfigError::Invalid { file, line, key, reason }
            }
            other => other,
        }
    }
}

/// The line where `key` (`listener[0].waf[1]`, `plugins.dir`) is written in
/// `text`, or where the nearest enclosing table or value is.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let document = toml::de::DeTable::parse(text).ok()?;
    let mut found = None;
    let mut value: Option<&toml::de::DeValue<'_>> = None;
    let table = document.get_ref();
    for segment in key.split('.') {
        let (name, indexes) = match segment.split_once('[') {
            Some((name, rest)) => (name, rest),
            None => (segment, ""),
        };
        let next = match value {
            None => table.get(name),
            Some(v) => v.get(name),
        };
        let Some(next) = next else { break };
        found = Some(next.span().start);
        value = Some(next.get_ref());
        for index in indexes.split('[').filter(|i| !i.is_empty()) {
            let Some(item) = index.trim_end_matches(']').parse::<usize>().ok().and_then(|i| value?.get(i)) else {
                break;
            };
            found = Some(item.span().start);
            value = Some(item.get_ref());
        }
    }
    found.map(|offset| text[..offset.min(text.len())].matches('\n').count() + 1)
}

impl PluginSettings {
    /// Reads `path`; a missing file means no settings. Returns the bytes
    /// read too, so a caller can tell versions apart by exactly what it parsed.
    pub fn load(path: &Path) -> Result<(PluginSettings, Vec<u8>), ConfigError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Self::default(), Vec::new())),
            Err(source) => return Err(ConfigError::Read { file: path.to_owned(), source }),
        };
        let text = String::from_utf8_lossy(&bytes);
        let settings: PluginSettings = parse(path, &text)?;
        if let Err((key, reason)) = settings.validate() {
            return Err(ConfigError::Invalid {
                file: path.to_owned(),
                line: line_of_key(&text, key),
                key: key.to_owned(),
                reason: reason.to_owned(),
            });
        }
        Ok((settings, bytes))
    }
}

fn parse<T: serde::de::DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text)
        .map_err(|e| ConfigError::Parse { file: file.to_owned(), message: e.to_string().trim_end().to_owned() })
}

impl Config {
    /// Reads, parses and validates `path`. Relative paths inside the file are
    /// resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: path.to_owned(), source })?;
        let mut config: Config = parse(path, &text)?;
        config.source = path.to_owned();
        let base = path.parent().unwrap_or(Path::new("."));
        if config.plugins.dir.is_relative() {
            config.plugins.dir = base.join(&config.plugins.dir);
        }
        if let Some(cache_dir) = &config.plugins.cache_dir
            && cache_dir.is_relative()
        {
            config.plugins.cache_dir = Some(base.join(cache_dir));
        }
        for listener in &mut config.listener {
            for certificate in &mut listener.certificate {
                certificate.cert = base.join(&certificate.cert);
                certificate.key = base.join(&certificate.key);
            }
        }
        if let Some(admin) = &mut config.admin
            && let Some(token_file) = &admin.token_file
        {
            admin.token_file = Some(base.join(token_file));
        }
        for pool in &mut config.pool {
            if let Some(ca) = &pool.ca {
                pool.ca = Some(base.join(ca));
            }
        }
        if let Some(file) = &config.log.access_file {
            config.log.access_file = Some(base.join(file));
        }
        config.validate().map_err(|e| e.with_line(&text))?;
        Ok(config)
    }

    /// Parses `text` as if read from `source` (used by tests and `load`).
    pub fn from_toml(source: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = parse(source, text)?;
        config.source = source.to_owned();
        config.validate().map_err(|e| e.with_line(text))?;
        Ok(config)
    }
}
