//! The server configuration file (`osprey serve --config FILE`).
//!
//! Parsed once, strictly (`deny_unknown_fields`), into typed values with defaults that make
//! `osprey serve` work with no file at all. Command-line flags override the file in `main`.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted HTTP body or gRPC message, bytes.
    pub max_body_bytes: usize,
    /// Largest number of samples in one request (its batch dimension).
    pub max_request_batch: u32,
    /// Requests waiting per model before new ones are refused with 503/UNAVAILABLE.
    pub max_queue: usize,
    /// Deadline applied when a request names none, milliseconds.
    pub default_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 16 << 20,
            max_request_batch: 256,
            max_queue: 1024,
            default_timeout_ms: 5_000,
        }
    }
}

/// One in-process agent standing for a node.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub name: String,
    /// Worker threads this agent may use for inference.
    #[serde(default = "default_threads")]
    pub threads: u32,
}

fn default_threads() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub http_addr: String,
    pub grpc_addr: String,
    pub model_repository: Option<PathBuf>,
    pub limits: Limits,
    /// Largest batch the dynamic batcher forms (also capped by each model's `max_batch_size`).
    pub max_batch: u32,
    /// Local agents; empty means one agent with one thread per available core (max 4).
    pub agents: Vec<AgentConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            http_addr: "0.0.0.0:8000".into(),
            grpc_addr: "0.0.0.0:8001".into(),
            model_repository: None,
            limits: Limits::default(),
            max_batch: 16,
            agents: Vec::new(),
        }
    }
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<ServerConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<ServerConfig> {
        let c: ServerConfig =
            toml::from_str(text).map_err(|e| crate::model::toml_error(text, path, &e))?;
        if c.max_batch == 0 || c.limits.max_request_batch == 0 || c.limits.max_queue == 0 {
            return Err(Error::invalid(format!(
                "{}: max_batch, max_request_batch and max_queue must be positive",
                path.display()
            )));
        }
        if c.agents.iter().any(|a| a.threads == 0) {
            return Err(Error::invalid(format!(
                "{}: an agent needs at least one thread",
                path.display()
            )));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults_and_unknown_keys_fail() {
        let p = Path::new("osprey.toml");
        assert_eq!(ServerConfig::parse("", p).unwrap(), ServerConfig::default());
        let c = ServerConfig::parse("http_addr = \"127.0.0.1:9\"\n[limits]\nmax_queue = 3\n", p)
            .unwrap();
        assert_eq!(c.limits.max_queue, 3);
        let e = ServerConfig::parse("\n[limits]\nmax_qeue = 3\n", p).unwrap_err();
        assert!(
            e.message.contains("osprey.toml:3:") && e.message.contains("max_qeue"),
            "{e}"
        );
    }
}
