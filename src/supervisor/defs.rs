//! Registering, updating and unregistering definitions (API and config), and the config diff
//! used at start and on reload.
//!
//! An API write says who writes ([`Writer`]): the caller's account rule is checked again
//! under the key's definition lock, against the definition being replaced and the new one,
//! and the change it made ([`DefChange`]) is recorded on the task item it is for in the same
//! transaction as the definition. A write is committed to the store before memory changes;
//! the process's lifecycle then hears of it (a new definition is reconsidered, an
//! unregistered one forgotten once nothing runs on it). Refusals are typed ([`DefError`]).

use std::sync::Arc;

use super::Engine;
use super::lifecycle::{Input, ProcInput};
use super::registry::{Entry, ProcState};
use crate::config::ProcessConfig;
use crate::proto::FLAG_RUNNING;
use crate::spec::{Definition, FieldError, Identity, Labels, ProcKey, ProcSpec, Source};
use crate::store::ItemNote;

/// Why a definition write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefError {
    /// register_proc_info of a key that exists.
    #[error("{0}")]
    AlreadyRegistered(String),
    /// The key is declared in a config file: the file is changed, not the API.
    #[error("{0}")]
    DeclaredInConfig(String),
    /// Another definition holds the same identity (value_key).
    #[error("{0}")]
    Conflict(String),
    /// The caller may not use the definition's account.
    #[error("{0}")]
    Forbidden(String),
    /// The state store refused the write.
    #[error("{0}")]
    Store(String),
    /// unregister of a key that does not exist.
    #[error("{0}")]
    NotRegistered(String),
    /// The definition breaks a bound (its labels).
    #[error("{0}")]
    Invalid(String),
}

/// How a definition write treats an existing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// register_proc_info: an existing key answers 850 and nothing changes.
    Register,
    /// update_proc_info and inline specs: create or replace.
    Upsert,
}

/// What a definition write changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DefChange {
    Registered,
    /// The fields that differ (spec fields, `labels`).
    Updated(Vec<String>),
    Unchanged,
}

impl DefChange {
    /// As the task log says it: `registered`, `updated: start_cmd, env`, `unchanged`.
    pub fn describe(&self) -> String {
        match self {
            DefChange::Registered => "registered".into(),
            DefChange::Updated(f) => format!("updated: {}", f.join(", ")),
            DefChange::Unchanged => "unchanged".into(),
        }
    }
}

/// The account rule of whoever writes: may they use (replace, or create) a definition that
/// runs as this account? `Err` carries the reason.
pub type AccountRule = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Who writes a definition through the API, and for which task item.
#[derive(Clone)]
pub struct Writer {
    pub may_use: AccountRule,
    /// The only account the writer may act on (`None`: any), checked again when a queued
    /// operation begins.
    pub only: Option<String>,
    /// The task item (task id, index) the write is recorded on.
    pub item: Option<(String, usize)>,
}

impl Writer {
    /// Refuse unless the rule allows `account`.
    pub fn check(&self, account: &str) -> Result<(), DefError> {
        (self.may_use)(account).map_err(DefError::Forbidden)
    }

    fn note(&self, change: &DefChange) -> Option<ItemNote> {
        self.item.as_ref().map(|(task_id, idx)| ItemNote {
            task_id: task_id.clone(),
            idx: *idx,
            change: change.describe(),
        })
    }
}

/// A definition write in progress on a key: queued operations wait until it is dropped.
pub(crate) struct Defining<'a> {
    engine: &'a Arc<Engine>,
    key: ProcKey,
}

impl<'a> Defining<'a> {
    pub(crate) fn begin(engine: &'a Arc<Engine>, key: &ProcKey) -> Defining<'a> {
        engine.feed(key, ProcInput::Defining(true));
        Defining {
            engine,
            key: key.clone(),
        }
    }
}

impl Drop for Defining<'_> {
    fn drop(&mut self) {
        self.engine.feed(&self.key, ProcInput::Defining(false));
    }
}

impl Engine {
    /// Create or update a definition from the API (register, update, an inline spec).
    /// Returns the change made.
    pub async fn put_definition(
        self: &Arc<Self>,
        key: &ProcKey,
        labels: Labels,
        spec: ProcSpec,
        mode: PutMode,
        w: &Writer,
    ) -> Result<DefChange, DefError> {
        // Queued operations wait from now on: the write goes before them.
        let _defining = Defining::begin(self, key);
        let lock = self.def_lock(key);
        let _g = lock.lock().await;
        self.put_definition_locked(key, labels, spec, mode, w).await
    }

    /// As [`Engine::put_definition`], for a caller holding the key's definition lock (and a
    /// [`Defining`] mark).
    pub(crate) async fn put_definition_locked(
        self: &Arc<Self>,
        key: &ProcKey,
        labels: Labels,
        spec: ProcSpec,
        mode: PutMode,
        w: &Writer,
    ) -> Result<DefChange, DefError> {
        // Every way a definition is written comes here: the bounds on labels hold for all.
        let errs = crate::spec::validate_labels(&labels);
        if !errs.is_empty() {
            return Err(DefError::Invalid(FieldError::joined(&errs)));
        }
        self.no_operation(key).await;
        let now = crate::util::unix_now();
        let existing = self.definition(key);
        // Checked here, under the lock, as well as when the request was accepted: the
        // definition may have been replaced since.
        if let Some(d) = &existing {
            w.check(&d.spec.account)?;
        }
        w.check(&spec.account)?;
        if let Some(old) = &existing {
            if mode == PutMode::Register {
                return Err(DefError::AlreadyRegistered(format!(
                    "process {key} is already registered; use update_proc_info to change it"
                )));
            }
            // The same spec sent again (an inline spec with every operation, say) changes
            // nothing, whatever declared it: nothing to store, nothing to refuse.
            if old.spec == spec && (labels.is_empty() || labels == old.labels) {
                let change = DefChange::Unchanged;
                if let Some(n) = w.note(&change) {
                    self.tasks.note_definition(&n.task_id, n.idx, &n.change);
                    self.store.note_item(n);
                }
                return Ok(change);
            }
            if let Source::Config { file } = &old.source {
                return Err(DefError::DeclaredInConfig(format!(
                    "process {key} is declared in the config file {file}; change it there and reload"
                )));
            }
        }
        if let Some(other) = self.identity_taken(key, &spec) {
            return Err(DefError::Conflict(other));
        }
        let labels = match (&existing, labels.is_empty()) {
            (Some(old), true) => old.labels.clone(),
            _ => labels,
        };
        let def = Definition {
            key: key.clone(),
            labels,
            spec,
            source: Source::Api,
            register_time: existing.as_ref().map(|d| d.register_time).unwrap_or(now),
            updated_time: now,
        };
        let change = match &existing {
            None => DefChange::Registered,
            Some(old) => DefChange::Updated(changed_fields(old, &def)),
        };
        let json = serde_json::to_string(&def)
            .map_err(|e| DefError::Store(format!("cannot encode the definition: {e}")))?;
        let note = w.note(&change);
        self.store
            .put_definition_noted(key, json, note.clone())
            .await
            .map_err(|e| DefError::Store(format!("the state store refused the change: {e}")))?;
        if let Some(n) = note {
            self.tasks.note_definition(&n.task_id, n.idx, &n.change);
        }
        let created = self.install(def, ProcState::default());
        if created {
            self.events.emit(
                Some(key),
                "registered",
                "definition registered",
                serde_json::Value::Null,
            );
        } else {
            self.events.emit(
                Some(key),
                "updated",
                change.describe(),
                serde_json::Value::Null,
            );
        }
        Ok(change)
    }

    /// Put a committed definition in memory: a new entry (with `state`), or the replaced
    /// definition of an existing one (its state kept). The lifecycle is told, and a new
    /// process's pid file is looked at in the background. Returns whether it was new.
    fn install(self: &Arc<Self>, def: Definition, state: ProcState) -> bool {
        let key = def.key.clone();
        let n = def.spec.instance_num.max(1) as usize;
        let created = {
            let mut reg = self.reg();
            match reg.get_mut(&key) {
                Some(e) => {
                    e.life.account = def.spec.account.clone();
                    e.def = std::sync::Arc::new(def);
                    e.invalid = None;
                    e.life.resize(n);
                    false
                }
                None => {
                    reg.entries.insert(key.clone(), Entry::new(def, state));
                    true
                }
            }
        };
        if let Some(e) = self.reg().get(&key) {
            self.store.put_state_bg(&key, e.state_json());
        }
        if created {
            self.discover_one(&key);
        } else {
            // Containment: running instances get a changed limit now.
            self.reapply_limits(&key);
        }
        let instances = self
            .reg()
            .get(&key)
            .map(|e| e.life.instances.len())
            .unwrap_or(0);
        for i in 0..instances {
            self.feed(
                &key,
                ProcInput::Instance {
                    i,
                    input: Input::DefinitionChanged,
                },
            );
        }
        created
    }

    /// Which other definition already has this spec's value_key (the identity that names
    /// one process only), described.
    fn identity_taken(&self, key: &ProcKey, spec: &ProcSpec) -> Option<String> {
        let id = Identity::of(spec);
        if !id.is_value_key() {
            return None;
        }
        let reg = self.reg();
        reg.entries
            .values()
            .find(|e| &e.def.key != key && Identity::of(&e.def.spec) == id)
            .map(|e| {
                format!(
                    "value_key {:?} is already used by process {} (setup_path {:?}, proc_name {:?}); a value_key names one process, so two processes with the same setup_path and proc_name need distinct value_keys",
                    spec.value_key, e.def.key, e.def.spec.setup_path, e.def.spec.proc_name
                )
            })
    }

    /// Remove a definition. The process, if running, is left running and no longer watched.
    /// The writer's account rule is checked under the lock against the definition removed.
    pub async fn remove_definition(
        self: &Arc<Self>,
        key: &ProcKey,
        w: &Writer,
    ) -> Result<(), DefError> {
        let defining = Defining::begin(self, key);
        let lock = self.def_lock(key);
        let _g = lock.lock().await;
        self.no_operation(key).await;
        drop(defining);
        let Some(def) = self.definition(key) else {
            return Err(DefError::NotRegistered(format!(
                "process {key} is not registered"
            )));
        };
        w.check(&def.spec.account)?;
        if let Source::Config { file } = &def.source {
            return Err(DefError::DeclaredInConfig(format!(
                "process {key} is declared in the config file {file}; remove it there and reload"
            )));
        }
        self.store
            .delete_definition(key)
            .await
            .map_err(|e| DefError::Store(format!("the state store refused the change: {e}")))?;
        self.forget(key).await;
        self.events.emit(
            Some(key),
            "unregistered",
            "definition removed; the process is no longer watched",
            serde_json::Value::Null,
        );
        // Its cgroups go once empty (now, or at a later housekeeping pass).
        self.prune_cgroups();
        Ok(())
    }
}

/// One field of a definition that a config (re)load changes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FieldChange {
    /// A spec field (`start_cmd`, `env`, ...), `labels`, or `source`.
    pub field: String,
    pub old: serde_json::Value,
    pub new: serde_json::Value,
}

/// A definition a config (re)load changes, field by field.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Changed {
    pub key: String,
    pub fields: Vec<FieldChange>,
}

/// What a config (re)load would change.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConfigDiff {
    pub added: Vec<String>,
    /// The definitions that change, with every changed field's old and new value.
    pub changed: Vec<Changed>,
    pub removed: Vec<String>,
    /// Running processes whose change needs a restart to take effect.
    pub restart: Vec<String>,
    /// Declared definitions that stay as they are.
    pub unchanged: usize,
}

impl ConfigDiff {
    /// Does applying this diff change anything?
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Fields whose change only takes effect when the process restarts.
pub const RESTART_FIELDS: &[&str] = &[
    "setup_path",
    "proc_name",
    "pid_path",
    "account",
    "start_cmd",
    "env",
    "instance_num",
];

/// The fields that differ between two definitions (labels and spec), with both values.
pub fn field_changes(a: &Definition, b: &Definition) -> Vec<FieldChange> {
    let mut out = Vec::new();
    if a.labels != b.labels {
        out.push(FieldChange {
            field: "labels".to_string(),
            old: serde_json::to_value(&a.labels).unwrap_or_default(),
            new: serde_json::to_value(&b.labels).unwrap_or_default(),
        });
    }
    let ja = serde_json::to_value(&a.spec).unwrap_or_default();
    let jb = serde_json::to_value(&b.spec).unwrap_or_default();
    if let (Some(ma), Some(mb)) = (ja.as_object(), jb.as_object()) {
        for (k, va) in ma {
            let vb = mb.get(k).cloned().unwrap_or_default();
            if vb != *va {
                out.push(FieldChange {
                    field: k.clone(),
                    old: va.clone(),
                    new: vb,
                });
            }
        }
    }
    out
}

/// The names of the fields that differ between two definitions (labels and spec).
pub fn changed_fields(a: &Definition, b: &Definition) -> Vec<String> {
    field_changes(a, b).into_iter().map(|c| c.field).collect()
}

impl Engine {
    /// Compare the registry's config-declared definitions with a new list.
    pub fn config_diff(&self, new: &[ProcessConfig]) -> ConfigDiff {
        let reg = self.reg();
        let mut d = ConfigDiff::default();
        for p in new {
            let k = &p.definition.key;
            match reg.get(k) {
                None => d.added.push(k.to_string()),
                Some(e) => {
                    let mut fields = field_changes(&e.def, &p.definition);
                    if matches!(e.def.source, Source::Api) {
                        fields.insert(
                            0,
                            FieldChange {
                                field: "source".into(),
                                old: serde_json::json!("api"),
                                new: serde_json::json!("config"),
                            },
                        );
                    }
                    if fields.is_empty() {
                        d.unchanged += 1;
                        continue;
                    }
                    if !e.tracked.is_empty()
                        && fields
                            .iter()
                            .any(|f| RESTART_FIELDS.contains(&f.field.as_str()))
                    {
                        d.restart.push(k.to_string());
                    }
                    d.changed.push(Changed {
                        key: k.to_string(),
                        fields,
                    });
                }
            }
        }
        for e in reg.entries.values() {
            if matches!(e.def.source, Source::Config { .. })
                && !new.iter().any(|p| p.definition.key == e.def.key)
            {
                d.removed.push(e.def.key.to_string());
            }
        }
        d.removed.sort();
        d
    }

    /// Make the registry match the config's processes: add new ones (managed and expected
    /// running when `autostart`), update changed ones (keeping their state), remove config
    /// entries no longer declared (their processes are left running, unwatched). Returns the
    /// diff applied.
    pub async fn apply_config(
        self: &Arc<Self>,
        new: &[ProcessConfig],
    ) -> Result<ConfigDiff, crate::store::StoreError> {
        let d = self.config_diff(new);
        for p in new {
            let k = &p.definition.key;
            let lock = self.def_lock(k);
            let _g = lock.lock().await;
            let existing = self.definition(k);
            let mut def = p.definition.clone();
            if let Some(old) = &existing {
                def.register_time = old.register_time;
                if changed_fields(old, &def).is_empty() && old.source == def.source {
                    continue;
                }
            }
            let json = serde_json::to_string(&def)
                .map_err(|e| crate::store::StoreError::Write(e.to_string()))?;
            self.store.put_definition(k, json).await?;
            let state = if p.autostart {
                ProcState {
                    flag: FLAG_RUNNING,
                    managed: true,
                    ..ProcState::default()
                }
            } else {
                ProcState::default()
            };
            let created = self.install(def, state);
            if created {
                let json = self.reg().get(k).map(|e| e.state_json());
                if let Some(json) = json {
                    self.store.put_state_queued(k, json).await?;
                }
                self.events.emit(
                    Some(k),
                    "registered",
                    "declared in the config",
                    serde_json::Value::Null,
                );
            } else {
                self.events.emit(
                    Some(k),
                    "updated",
                    "definition updated from the config",
                    serde_json::Value::Null,
                );
            }
        }
        for k in &d.removed {
            if let Ok(key) = k.parse::<ProcKey>() {
                let lock = self.def_lock(&key);
                let _g = lock.lock().await;
                self.store.delete_definition(&key).await?;
                self.forget(&key).await;
                self.events.emit(
                    Some(&key),
                    "unregistered",
                    "no longer declared in the config; left as it is",
                    serde_json::Value::Null,
                );
            }
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(f: impl FnOnce(&mut Definition)) -> Definition {
        let mut d = Definition {
            key: ProcKey::new("n", "x"),
            labels: Labels::new(),
            spec: ProcSpec {
                setup_path: "/opt/x".into(),
                proc_name: "x".into(),
                start_cmd: "./x".into(),
                ..ProcSpec::default()
            },
            source: Source::Api,
            register_time: 1,
            updated_time: 1,
        };
        f(&mut d);
        d
    }

    #[test]
    fn field_changes_name_each_field_with_both_values() {
        let a = def(|_| {});
        // (change, expected fields)
        let table: Vec<(Definition, Vec<&str>)> = vec![
            (def(|_| {}), vec![]),
            (def(|d| d.updated_time = 99), vec![]),
            (
                def(|d| d.spec.start_cmd = "./x --new".into()),
                vec!["start_cmd"],
            ),
            (
                def(|d| {
                    d.spec.stop_cmd = "kill".into();
                    d.labels.insert("app".into(), json!("x"));
                }),
                vec!["labels", "stop_cmd"],
            ),
            (
                def(|d| {
                    d.spec.env.insert("A".into(), "1".into());
                }),
                vec!["env"],
            ),
        ];
        for (b, want) in table {
            let got = field_changes(&a, &b);
            let names: Vec<&str> = got.iter().map(|c| c.field.as_str()).collect();
            assert_eq!(names, want);
        }
        let c = field_changes(&a, &def(|d| d.spec.start_cmd = "./x --new".into()));
        assert_eq!(c[0].old, json!("./x"));
        assert_eq!(c[0].new, json!("./x --new"));
        assert!(RESTART_FIELDS.contains(&"start_cmd") && !RESTART_FIELDS.contains(&"stop_cmd"));
    }
}
