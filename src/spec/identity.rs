//! A process's identity as GSE names it without `meta`: its `value_key` when it has one,
//! else its `setup_path` + `proc_name` (compared exactly as written). The one function that
//! computes it, used wherever identities are compared (matching `operate_process` entries,
//! refusing a second definition with a value_key already in use).

use super::ProcSpec;

/// How GSE names a process without `meta`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    ValueKey(String),
    Path {
        setup_path: String,
        proc_name: String,
    },
}

impl Identity {
    /// The identity of these fields: `value_key` when not empty, else the path.
    pub fn new(value_key: &str, setup_path: &str, proc_name: &str) -> Identity {
        if value_key.is_empty() {
            Identity::Path {
                setup_path: setup_path.to_string(),
                proc_name: proc_name.to_string(),
            }
        } else {
            Identity::ValueKey(value_key.to_string())
        }
    }

    /// The identity of a spec.
    pub fn of(spec: &ProcSpec) -> Identity {
        Identity::new(&spec.value_key, &spec.setup_path, &spec.proc_name)
    }

    /// Whether it is a value_key (which names one process only; a path may be shared).
    pub fn is_value_key(&self) -> bool {
        matches!(self, Identity::ValueKey(_))
    }

    /// For messages: `value_key "x"`, or `setup_path "/a" and proc_name "b"`.
    pub fn describe(&self) -> String {
        match self {
            Identity::ValueKey(v) => format!("value_key {v:?}"),
            Identity::Path {
                setup_path,
                proc_name,
            } => format!("setup_path {setup_path:?} and proc_name {proc_name:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_key_wins_over_the_path() {
        let mut s = ProcSpec {
            setup_path: "/opt/a".into(),
            proc_name: "a".into(),
            ..ProcSpec::default()
        };
        assert_eq!(
            Identity::of(&s),
            Identity::Path {
                setup_path: "/opt/a".into(),
                proc_name: "a".into()
            }
        );
        assert!(!Identity::of(&s).is_value_key());
        s.value_key = "k".into();
        assert_eq!(Identity::of(&s), Identity::ValueKey("k".into()));
        assert_eq!(Identity::of(&s).describe(), "value_key \"k\"");
    }
}
