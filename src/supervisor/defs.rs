//! Registering, updating and unregistering definitions (API and config), and the config diff
//! used at start and on reload.
//!
//! An API write says who writes ([`Writer`]): the caller's account rule is checked again
//! under the process's operation lock, against the definition being replaced and the new
//! one, and the change it made ([`DefChange`]) is recorded on the task item it is for in the
//! same transaction as the definition.

use std::sync::Arc;

use super::Engine;
use crate::config::ProcessConfig;
use crate::proto::{KeyResult, codes};
use crate::registry::{Entry, FLAG_RUNNING, ProcState};
use crate::spec::{Definition, Labels, ProcKey, ProcSpec, Source};
use crate::store::ItemNote;

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
    /// The task item (task id, index) the write is recorded on.
    pub item: Option<(String, usize)>,
}

impl Writer {
    /// Refuse (1000403 on the key) unless the rule allows `account`.
    pub fn check(&self, account: &str) -> Result<(), KeyResult> {
        (self.may_use)(account).map_err(|m| KeyResult::err(codes::FORBIDDEN, m))
    }

    fn note(&self, change: &DefChange) -> Option<ItemNote> {
        self.item.as_ref().map(|(task_id, idx)| ItemNote {
            task_id: task_id.clone(),
            idx: *idx,
            change: change.describe(),
        })
    }
}

/// Create or update a definition from the API. Commits to the store before changing memory.
/// Returns the answer and, when it did something, the change.
pub async fn put_definition(
    engine: &Arc<Engine>,
    key: &ProcKey,
    labels: Labels,
    spec: ProcSpec,
    mode: PutMode,
    w: &Writer,
) -> (KeyResult, Option<DefChange>) {
    let lock = engine.op_lock(key);
    let _g = lock.lock().await;
    put_definition_locked(engine, key, labels, spec, mode, w).await
}

/// As [`put_definition`], for a caller that holds the operation lock.
pub async fn put_definition_locked(
    engine: &Arc<Engine>,
    key: &ProcKey,
    labels: Labels,
    spec: ProcSpec,
    mode: PutMode,
    w: &Writer,
) -> (KeyResult, Option<DefChange>) {
    let now = crate::util::unix_now();
    let existing = engine.reg().get(key).map(|e| e.def.clone());
    // Checked here, under the lock, as well as when the request was accepted: the
    // definition may have been replaced since.
    if let Some(Err(r)) = existing.as_ref().map(|d| w.check(&d.spec.account)) {
        return (r, None);
    }
    if let Err(r) = w.check(&spec.account) {
        return (r, None);
    }
    if let Some(old) = &existing {
        if mode == PutMode::Register {
            return (
                KeyResult::err(
                    codes::ALREADY_REGISTERED,
                    format!(
                        "process {key} is already registered; use update_proc_info to change it"
                    ),
                ),
                None,
            );
        }
        // The same spec sent again (an inline spec with every operation, say) changes
        // nothing, whatever declared it: nothing to store, nothing to refuse.
        let unchanged = old.spec == spec && (labels.is_empty() || labels == old.labels);
        if unchanged {
            let change = DefChange::Unchanged;
            if let Some(n) = w.note(&change) {
                engine.tasks.note_definition(&n.task_id, n.idx, &n.change);
                engine.store.note_item(n);
            }
            return (KeyResult::ok(""), Some(change));
        }
        if let Source::Config { file } = &old.source {
            return (
                KeyResult::err(
                    codes::SPEC_INVALID,
                    format!(
                        "process {key} is declared in the config file {file}; change it there and reload"
                    ),
                ),
                None,
            );
        }
    }
    if !spec.value_key.is_empty() {
        let other = engine
            .reg()
            .find_by_identity(&spec.setup_path, &spec.proc_name, &spec.value_key)
            .filter(|k| k != key);
        if let Some(other) = other {
            let (sp, pn) = engine
                .reg()
                .get(&other)
                .map(|e| (e.def.spec.setup_path.clone(), e.def.spec.proc_name.clone()))
                .unwrap_or_default();
            return (
                KeyResult::err(
                    codes::SPEC_INVALID,
                    format!(
                        "value_key {:?} is already used by process {other} (setup_path {sp:?}, proc_name {pn:?}); a value_key names one process, so two processes with the same setup_path and proc_name need distinct value_keys",
                        spec.value_key
                    ),
                ),
                None,
            );
        }
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
    let json = match serde_json::to_string(&def) {
        Ok(j) => j,
        Err(e) => {
            return (
                KeyResult::err(
                    codes::OP_FAILED,
                    format!("cannot encode the definition: {e}"),
                ),
                None,
            );
        }
    };
    let note = w.note(&change);
    if let Err(e) = engine
        .store
        .put_definition_noted(key, json, note.clone())
        .await
    {
        return (
            KeyResult::err(
                codes::OP_FAILED,
                format!("the state store refused the change: {e}"),
            ),
            None,
        );
    }
    if let Some(n) = note {
        engine.tasks.note_definition(&n.task_id, n.idx, &n.change);
    }
    let created = {
        let mut reg = engine.reg();
        match reg.get_mut(key) {
            Some(e) => {
                e.def = def;
                false
            }
            None => {
                reg.entries
                    .insert(key.clone(), Entry::new(def, ProcState::default()));
                true
            }
        }
    };
    if created {
        engine.persist_bg(key);
        engine.events.emit(
            Some(key),
            "registered",
            "definition registered",
            serde_json::Value::Null,
        );
        engine.discover_bg(key);
    } else {
        engine.events.emit(
            Some(key),
            "updated",
            change.describe(),
            serde_json::Value::Null,
        );
    }
    engine.reconcile(key);
    (KeyResult::ok(""), Some(change))
}

/// Remove a definition. The process, if running, is left running and no longer watched.
/// The writer's account rule is checked under the lock against the definition removed.
pub async fn remove_definition(engine: &Arc<Engine>, key: &ProcKey, w: &Writer) -> KeyResult {
    let lock = engine.op_lock(key);
    let _g = lock.lock().await;
    let found = engine
        .reg()
        .get(key)
        .map(|e| (e.def.source.clone(), e.def.spec.account.clone()));
    if let Some(Err(r)) = found.as_ref().map(|(_, a)| w.check(a)) {
        return r;
    }
    match found.map(|(s, _)| s) {
        None => KeyResult::err(
            codes::PROC_NOT_RUNNING,
            format!("process {key} is not registered"),
        ),
        Some(Source::Config { file }) => KeyResult::err(
            codes::SPEC_INVALID,
            format!(
                "process {key} is declared in the config file {file}; remove it there and reload"
            ),
        ),
        Some(Source::Api) => {
            if let Err(e) = engine.store.delete_definition(key).await {
                return KeyResult::err(
                    codes::OP_FAILED,
                    format!("the state store refused the change: {e}"),
                );
            }
            forget(engine, key);
            engine.events.emit(
                Some(key),
                "unregistered",
                "definition removed; the process is no longer watched",
                serde_json::Value::Null,
            );
            KeyResult::ok("")
        }
    }
}

fn forget(engine: &Engine, key: &ProcKey) {
    let mut reg = engine.reg();
    if let Some(e) = reg.entries.remove(key) {
        for (_, h) in e.rt.watchers {
            h.abort();
        }
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

/// Compare the registry's config-declared definitions with a new list.
pub fn diff(engine: &Engine, new: &[ProcessConfig]) -> ConfigDiff {
    let reg = engine.reg();
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
                if !e.state.instances.is_empty()
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
/// entries no longer declared (their processes are left running, unwatched).
/// Returns the diff applied.
pub async fn apply_config(
    engine: &Arc<Engine>,
    new: &[ProcessConfig],
) -> Result<ConfigDiff, crate::store::StoreError> {
    let d = diff(engine, new);
    for p in new {
        let k = &p.definition.key;
        let lock = engine.op_lock(k);
        let _g = lock.lock().await;
        let existing = engine.reg().get(k).map(|e| e.def.clone());
        let mut def = p.definition.clone();
        if let Some(old) = &existing {
            def.register_time = old.register_time;
            if changed_fields(old, &def).is_empty() && old.source == def.source {
                continue;
            }
        }
        let json = serde_json::to_string(&def)
            .map_err(|e| crate::store::StoreError::Write(e.to_string()))?;
        engine.store.put_definition(k, json).await?;
        let created = {
            let mut reg = engine.reg();
            match reg.get_mut(k) {
                Some(e) => {
                    e.def = def;
                    false
                }
                None => {
                    let st = if p.autostart {
                        ProcState {
                            flag: FLAG_RUNNING,
                            managed: true,
                            ..ProcState::default()
                        }
                    } else {
                        ProcState::default()
                    };
                    reg.entries.insert(k.clone(), Entry::new(def, st));
                    true
                }
            }
        };
        if created {
            engine.discover_bg(k);
            engine.persist(k).await?;
            engine.events.emit(
                Some(k),
                "registered",
                "declared in the config",
                serde_json::Value::Null,
            );
        } else {
            engine.events.emit(
                Some(k),
                "updated",
                "definition updated from the config",
                serde_json::Value::Null,
            );
        }
        engine.reconcile(k);
    }
    for k in &d.removed {
        if let Ok(key) = k.parse::<ProcKey>() {
            let lock = engine.op_lock(&key);
            let _g = lock.lock().await;
            engine.store.delete_definition(&key).await?;
            forget(engine, &key);
            engine.events.emit(
                Some(&key),
                "unregistered",
                "no longer declared in the config; left as it is",
                serde_json::Value::Null,
            );
        }
    }
    Ok(d)
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
