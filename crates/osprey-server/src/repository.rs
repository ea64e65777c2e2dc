//! Model control, as Triton has it: which models of the repository the gateway serves, changed
//! while it serves.
//!
//! `--model-control-mode`:
//! - `none` (the default): every model of the repository is loaded at start; load and unload
//!   requests are refused.
//! - `explicit`: only the models named by `--load-model` (`*`: all) are loaded at start;
//!   `POST /v2/repository/models/{m}/load` and `…/unload` (admin role) load, reload and unload
//!   single models.
//! - `poll`: everything is loaded at start and the repository is scanned every
//!   `--repository-poll-secs`: a new model folder is loaded, a changed one reloaded, a removed
//!   one unloaded. Load and unload requests are refused, as Triton refuses them then.
//!
//! **Load before unload, nothing lost in flight.** A load reads and checks every variant,
//! loads its sessions and profile first, while the current revision keeps serving; a failure
//! leaves that revision serving and is returned (and listed in the index when nothing serves
//! the name). The new revision is then added to the dispatcher under a fresh id and the name
//! switched to it; the old one is retired: it takes no new request, finishes what it has
//! queued and running on its own sessions, and is released when the dispatcher says it is
//! done ([`osprey_policy::dispatch::Dispatcher::retire_model`]). An unload is a retirement
//! with nothing replacing it: requests already admitted are answered, later ones get 404.
//!
//! **What it does not cover.** Pipelines and split models are built at start from the models
//! then served; a model that a pipeline uses as a stage is neither reloaded nor unloaded (the
//! request says so), and pipelines and split models themselves are not loaded or unloaded at
//! run time. Remote agents hold their own copy of the repository: a model loaded at run time is
//! placed on the agents that had its folder when they joined, and each load re-reads the
//! model's folder on the agent (so a reload runs the agent's copy as it is then; keeping the
//! copies alike is the operator's, as with any file on those machines). The control loop's
//! targets are the models served at start; a model loaded later has its variant chosen per
//! batch.

use crate::gateway::Gateway;
use osprey_core::error::{Error, Result};
use osprey_core::model::{ModelSpec, RepositoryProblem, is_valid_name};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `--model-control-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    None,
    Poll,
    Explicit,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "none" => Some(Mode::None),
            "poll" => Some(Mode::Poll),
            "explicit" => Some(Mode::Explicit),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Poll => "poll",
            Mode::Explicit => "explicit",
        }
    }
}

/// The gateway's model-control state.
pub struct Control {
    repository: Option<PathBuf>,
    mode: Mode,
    /// One load or unload at a time (a poll pass counts as one).
    busy: tokio::sync::Mutex<()>,
    /// Models being loaded now (the index says `LOADING`).
    loading: Mutex<BTreeSet<String>>,
    /// Per model folder, its fingerprint when it was last loaded or tried (poll mode).
    seen: Mutex<BTreeMap<String, u64>>,
}

impl Control {
    pub fn new(repository: Option<PathBuf>, mode: Mode) -> Control {
        let seen = match (&repository, mode) {
            (Some(r), Mode::Poll) => fingerprints(r),
            _ => BTreeMap::new(),
        };
        Control {
            repository,
            mode,
            busy: tokio::sync::Mutex::new(()),
            loading: Mutex::default(),
            seen: Mutex::new(seen),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }
}

/// One row of the repository index.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub state: &'static str,
    pub reason: String,
}

/// A fingerprint of a model folder: every file's relative path, size and modification time,
/// recursively (a changed, added or removed file changes it).
fn fingerprint(dir: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(p);
            } else {
                let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                files.push((p.strip_prefix(dir).map(Path::to_path_buf).unwrap_or(p), meta.len(), mtime));
            }
        }
    }
    files.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    files.hash(&mut h);
    h.finish()
}

/// The model folders of `repo` (those with a `model.toml`) and their fingerprints.
fn fingerprints(repo: &Path) -> BTreeMap<String, u64> {
    let Ok(entries) = std::fs::read_dir(repo) else { return BTreeMap::new() };
    entries
        .flatten()
        .filter(|e| e.path().join("model.toml").is_file())
        .filter_map(|e| e.file_name().to_str().map(|n| (n.to_string(), fingerprint(&e.path()))))
        .collect()
}

impl Gateway {
    fn repository_dir(&self) -> Result<&Path> {
        self.control
            .repository
            .as_deref()
            .ok_or_else(|| Error::unavailable("this server has no model repository to load from"))
    }

    /// Refuses a load or unload request unless the mode is `explicit`.
    fn explicit_only(&self) -> Result<()> {
        match self.control.mode {
            Mode::Explicit => Ok(()),
            Mode::None => Err(Error::unavailable(
                "model control is off (--model-control-mode none): start with --model-control-mode explicit \
                 to load and unload models",
            )),
            Mode::Poll => Err(Error::unavailable(
                "the repository is polled (--model-control-mode poll): change the model's folder, or start with \
                 --model-control-mode explicit to load and unload by request",
            )),
        }
    }

    /// Why `name` cannot be loaded or unloaded on its own, if it cannot.
    fn fixed(&self, name: &str) -> Result<()> {
        if self.pipeline(name).is_some() || self.split(name).is_some() || self.multimodal(name).is_some() {
            return Err(Error::invalid(format!(
                "'{name}' is a pipeline, a split model or a multi-modal model: those are built at start and not \
                 loaded or unloaded at run time"
            )));
        }
        if let Some(p) = self.pipelines().find(|p| p.stages.iter().any(|s| s.name() == name)) {
            return Err(Error::invalid(format!(
                "model '{name}' is a stage of pipeline '{}', which is served: stage models are not reloaded or \
                 unloaded while it is",
                p.name()
            )));
        }
        Ok(())
    }

    /// `POST /v2/repository/models/{name}/load` (explicit mode): loads or reloads `name`.
    pub async fn request_load(self: &Arc<Self>, name: &str) -> Result<()> {
        self.explicit_only()?;
        let _one = self.control.busy.lock().await;
        self.load_model(name).await
    }

    /// `POST /v2/repository/models/{name}/unload` (explicit mode).
    pub async fn request_unload(self: &Arc<Self>, name: &str) -> Result<()> {
        self.explicit_only()?;
        let _one = self.control.busy.lock().await;
        self.unload_model(name)
    }

    /// Loads `name` from the repository, replacing the revision served now (module docs).
    async fn load_model(self: &Arc<Self>, name: &str) -> Result<()> {
        if !is_valid_name(name) {
            return Err(Error::invalid(format!("'{name}' is not a valid model name")));
        }
        self.fixed(name)?;
        let dir = self.repository_dir()?.join(name);
        if !dir.join("model.toml").is_file() {
            return Err(Error::not_found(format!(
                "no model '{name}' in the repository {} (no {name}/model.toml)",
                self.repository_dir()?.display()
            )));
        }
        let fp = fingerprint(&dir);
        self.control.loading.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string());
        let gw = self.clone();
        let built = tokio::task::spawn_blocking(move || {
            let spec = ModelSpec::load(&dir)?;
            let variants = gw.builder.load(&spec)?;
            Ok::<_, Error>((spec, variants))
        })
        .await
        .unwrap_or_else(|_| Err(Error::internal("loading the model panicked")));
        self.control.loading.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        self.control.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), fp);
        let (spec, variants) = match built {
            Ok(b) => b,
            Err(error) => {
                let serving = self.model(name).is_ok();
                tracing::error!(model = %name, serving, "load failed: {}", error.message);
                if !serving {
                    self.set_problem(name, Some(error.clone()));
                }
                return Err(error);
            }
        };
        let setup = self.builder.setup(&spec, &variants);
        let metrics = self.metrics.clone();
        let gw = self.clone();
        let entry =
            self.cluster.add_model(move |id| Arc::new(gw.builder.entry(spec, variants, id, &metrics)), setup);
        let old =
            self.models.write().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), entry.clone());
        self.set_problem(name, None);
        let names: Vec<&str> = entry.variants.iter().map(|v| v.spec.name.as_str()).collect();
        match old {
            Some(old) => {
                self.cluster.retire_model(old.index);
                tracing::info!(model = %name, variants = %names.join(","), "model reloaded");
            }
            None => tracing::info!(model = %name, variants = %names.join(","), "model loaded"),
        }
        Ok(())
    }

    /// Stops serving `name` (module docs). Unloading a model of the repository that is not
    /// served is a no-op, as in Triton.
    fn unload_model(&self, name: &str) -> Result<()> {
        self.fixed(name)?;
        let old = self.models.write().unwrap_or_else(|e| e.into_inner()).remove(name);
        match old {
            Some(old) => {
                self.cluster.retire_model(old.index);
                tracing::info!(model = %name, "model unloaded");
                Ok(())
            }
            None if self
                .control
                .repository
                .as_ref()
                .is_some_and(|r| r.join(name).join("model.toml").is_file()) =>
            {
                Ok(())
            }
            None => Err(Error::not_found(format!("unknown model '{name}'"))),
        }
    }

    fn set_problem(&self, name: &str, error: Option<Error>) {
        let mut problems = self.problems.write().unwrap_or_else(|e| e.into_inner());
        problems.retain(|p| p.model != name);
        if let Some(error) = error {
            problems.push(RepositoryProblem { model: name.to_string(), error });
        }
    }

    /// One poll pass (poll mode): loads new folders, reloads changed ones, unloads removed
    /// ones. Returns what it did, `(model, action)`.
    pub async fn poll_repository(self: &Arc<Self>) -> Vec<(String, &'static str)> {
        let Some(repo) = self.control.repository.clone() else { return Vec::new() };
        let _one = self.control.busy.lock().await;
        let now = fingerprints(&repo);
        let before = self.control.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let served: BTreeSet<String> =
            self.models.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        let mut done = Vec::new();
        for (name, fp) in &now {
            let changed = before.get(name) != Some(fp);
            if !changed || self.fixed(name).is_err() {
                continue;
            }
            let action = if served.contains(name) { "reloaded" } else { "loaded" };
            match self.load_model(name).await {
                Ok(()) => done.push((name.clone(), action)),
                Err(_) => done.push((name.clone(), "failed")),
            }
        }
        for name in served.iter().filter(|n| !now.contains_key(*n)) {
            if self.fixed(name).is_ok() && self.unload_model(name).is_ok() {
                done.push((name.clone(), "unloaded"));
            }
        }
        {
            let mut seen = self.control.seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.retain(|n, _| now.contains_key(n));
        }
        // A model folder that was there and is gone takes its problem with it.
        self.problems
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| now.contains_key(&p.model) || !before.contains_key(&p.model));
        done
    }

    /// The repository index: every served model's variants (`READY`), models being loaded
    /// (`LOADING`), and, for monitors and admins unless `ready_only`, the repository's other
    /// models (`UNAVAILABLE`, with the reason: a problem, or `unloaded`).
    pub fn repository_index(&self, tenant: usize, ready_only: bool) -> Vec<IndexEntry> {
        let visible = |name: &str| self.tenants.may_see(tenant, name);
        let entry = |name: &str, version: &str, state: &'static str, reason: String| IndexEntry {
            name: name.to_string(),
            version: version.to_string(),
            state,
            reason,
        };
        let served = self.models();
        let mut out: Vec<IndexEntry> = served
            .iter()
            .filter(|m| visible(m.name()))
            .flat_map(|m| {
                m.variants.iter().map(move |v| entry(m.name(), &v.spec.name, "READY", String::new()))
            })
            .collect();
        for d in self.splits().filter(|d| visible(d.name())) {
            if self.model_is_ready(d.name()) {
                out.push(entry(d.name(), "", "READY", String::new()));
            } else if !ready_only {
                out.push(entry(d.name(), "", "UNAVAILABLE", "no split plan is active".into()));
            }
        }
        for m in self.multimodals().filter(|m| visible(m.name())) {
            let ready = self.model_is_ready(m.name());
            if ready || !ready_only {
                out.push(entry(m.name(), "", if ready { "READY" } else { "UNAVAILABLE" }, String::new()));
            }
        }
        for p in self.pipelines().filter(|p| visible(p.name())) {
            let ready = self.model_is_ready(p.name());
            if ready || !ready_only {
                out.push(entry(p.name(), "", if ready { "READY" } else { "UNAVAILABLE" }, String::new()));
            }
        }
        if ready_only || self.tenants.role(tenant) < osprey_core::config::Role::Monitor {
            return out;
        }
        let loading = self.control.loading.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let problems = self.problems();
        let known: BTreeSet<String> = out.iter().map(|e| e.name.clone()).collect();
        for name in &loading {
            if !known.contains(name) {
                out.push(entry(name, "", "LOADING", String::new()));
            }
        }
        for p in &problems {
            if !known.contains(&p.model) && !loading.contains(&p.model) {
                out.push(entry(&p.model, "", "UNAVAILABLE", p.error.message.clone()));
            }
        }
        if let Some(repo) = &self.control.repository {
            for name in fingerprints(repo).into_keys() {
                let listed = known.contains(&name)
                    || loading.contains(&name)
                    || problems.iter().any(|p| p.model == name);
                if !listed {
                    out.push(entry(&name, "", "UNAVAILABLE", "unloaded".into()));
                }
            }
        }
        out
    }
}

/// Polls the repository every `every` (poll mode); the task ends with the process.
pub fn start_polling(gw: Arc<Gateway>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            for (model, action) in gw.poll_repository().await {
                tracing::info!(model = %model, "repository poll: {action}");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_changes_with_any_file_and_not_otherwise() {
        let d = std::env::temp_dir().join(format!("osprey-fp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("eval")).unwrap();
        std::fs::write(d.join("model.toml"), "a").unwrap();
        let a = fingerprint(&d);
        assert_eq!(a, fingerprint(&d));
        std::fs::write(d.join("eval/labels.csv"), "x").unwrap();
        let b = fingerprint(&d);
        assert_ne!(a, b, "a file added below");
        std::fs::write(d.join("model.toml"), "ab").unwrap();
        assert_ne!(b, fingerprint(&d), "a file grew");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn modes_parse_as_triton_names_them() {
        for m in [Mode::None, Mode::Poll, Mode::Explicit] {
            assert_eq!(Mode::parse(m.as_str()), Some(m));
        }
        assert_eq!(Mode::parse("POLL"), None);
    }
}
