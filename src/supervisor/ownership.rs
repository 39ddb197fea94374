//! The ownership rule: when a process belongs to an instance of a definition.
//!
//! One predicate, [`check`], decides it everywhere the agent adopts a process, answers 828
//! for one, signals one, restarts or reports one (decisions.md, "the ownership rule"). It is
//! pure: the caller reads the facts ([`crate::procinfo::read_facts`], off the async workers)
//! and the evidence it holds (its spawn records, the identity recorded in the store), and the
//! rule says yes, with the origin that proved it, or no, naming the point that failed.
//!
//! A process P belongs to an instance of definition D when all of these hold:
//! 1. P is not the agent, not PID 1, not a kernel thread, not a zombie, and not tracked under
//!    another key.
//! 2. Account: P's real uid is D's account uid, or D's account is root.
//! 3. Name: P's comm (as the kernel truncates it), executable file name or argv[0] file name
//!    equals D's `proc_name` file name, which is never empty; for an interpreter
//!    (`sh script`, `python3 app.py`), argv[1]'s file name counts as argv[0]'s. A definition
//!    without a pid file names its process by the command the agent ran: that command's own
//!    process needs no name check (the command *is* the process).
//! 4. Origin, one of: P is the process of a command the agent ran for D, or one of its
//!    descendants (same session or process group as the command, a descendant by parent
//!    links, or carrying the command's lineage token in its environment: how a daemon that
//!    double-forked into a session of its own and was reparented to the agent, a child
//!    subreaper, is told apart from the orphans of other definitions' commands), started at or
//!    after that command; or P is the identity (pid, start time, boot) recorded for D before an
//!    agent restart; or P's executable or working directory lies under D's `setup_path`.
//!    Being the agent's child proves nothing by itself: every orphan on the host below the
//!    agent is.
//!
//! 5. Cgroup (containment on): P is not in the cgroup of another definition. A process in
//!    the definition's own cgroups was started there by its commands; one outside every
//!    cgroup of the agent's subtree (started before containment, or by hand) that passes 1-4
//!    is adopted and moved into the instance's cgroup by the caller.
//!
//! A pid file alone is never proof: it only says which process to check.
//!
//! The members of an owned instance's process tree (its process group, session or
//! descendants: the workers it forks) are stopped with it when they pass points 1 and 2;
//! they need no name of their own ([`Role::Member`]).

use std::fmt;

use crate::procinfo::ProcFacts;

/// A command the agent ran for a definition (start, restart, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spawn {
    /// The shell's pid: also the session and process group it created (`setsid`).
    pub shell: i32,
    /// Boot-clock ticks just before the fork: everything it started began at or after this.
    pub ticks: u64,
    /// The command's lineage token ([`crate::util::LINEAGE_VAR`] in its environment).
    pub token: u128,
}

/// The definition's side of the rule.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    /// The uid of the definition's account (the agent's own when the account is empty).
    pub uid: u32,
    pub proc_name: &'a str,
    pub setup_path: &'a str,
    /// The definition names a pid file (else its process is the command's own process).
    pub has_pid_file: bool,
}

/// Where a candidate is, as containment sees it (point 5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CgroupFact {
    /// Containment is off (or the cgroup could not be read).
    #[default]
    Off,
    /// In one of the definition's own cgroups.
    Own,
    /// In the cgroup of another definition.
    Other,
    /// Outside every cgroup of the agent's subtree.
    Outside,
}

/// What the agent knows about how a candidate might have come to be.
#[derive(Debug, Clone, Copy, Default)]
pub struct Evidence<'a> {
    /// Where it is, with containment on (point 5).
    pub cgroup: CgroupFact,
    /// Commands the agent ran for this definition, newest first.
    pub spawns: &'a [Spawn],
    /// The (pid, start time) recorded for this definition before an agent restart, already
    /// checked to be of the current boot.
    pub recorded: &'a [(i32, u64)],
    /// The candidate's ancestors by parent links, nearest first.
    pub ancestors: &'a [i32],
    /// The candidate is tracked as an instance of another definition.
    pub tracked_elsewhere: bool,
    /// The agent's pid.
    pub agent_pid: i32,
    /// The canonical form of `setup_path`, when it differs (symlinked install trees).
    pub setup_real: Option<&'a str>,
}

/// What is being decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The instance itself (adopt, 828, status, main process to signal).
    Main,
    /// A member of an owned instance's process tree, to be stopped with it.
    Member,
}

/// How ownership was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Started by a command the agent ran for the definition.
    Spawned,
    /// The identity recorded before the agent restarted.
    Recorded,
    /// Started outside the agent, from the definition's install tree.
    SetupPath,
    /// Part of an owned instance's process tree.
    Tree,
}

impl Origin {
    pub fn describe(self) -> &'static str {
        match self {
            Origin::Spawned => "started by its own start command",
            Origin::Recorded => "recorded before the agent restarted",
            Origin::SetupPath => "running from its setup_path",
            Origin::Tree => "part of its process tree",
        }
    }
}

/// Why a process does not belong to the definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotOwned {
    Gone(i32),
    Forbidden {
        pid: i32,
        what: &'static str,
    },
    TrackedElsewhere(i32),
    /// In another definition's cgroup.
    OtherCgroup(i32),
    Account {
        pid: i32,
        uid: Option<u32>,
        want: u32,
    },
    EmptyName,
    Name {
        pid: i32,
        comm: String,
        want: String,
    },
    Origin {
        pid: i32,
    },
}

impl fmt::Display for NotOwned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotOwned::Gone(pid) => write!(f, "pid {pid} is not running"),
            NotOwned::Forbidden { pid, what } => write!(f, "pid {pid} is {what}"),
            NotOwned::TrackedElsewhere(pid) => {
                write!(f, "pid {pid} belongs to another registered process")
            }
            NotOwned::OtherCgroup(pid) => {
                write!(
                    f,
                    "pid {pid} is in the cgroup of another registered process"
                )
            }
            NotOwned::Account { pid, uid, want } => match uid {
                Some(u) => write!(
                    f,
                    "pid {pid} runs as uid {u}, not as the definition's account (uid {want})"
                ),
                None => write!(f, "pid {pid}: its account cannot be read"),
            },
            NotOwned::EmptyName => write!(
                f,
                "proc_name names no program (its last path component is empty)"
            ),
            NotOwned::Name { pid, comm, want } => {
                write!(f, "pid {pid} is {comm:?}, not {want:?}")
            }
            NotOwned::Origin { pid } => write!(
                f,
                "pid {pid} was not started by the agent for this process, is not the one recorded for it, and does not run from its setup_path"
            ),
        }
    }
}

fn basename(s: &str) -> &str {
    s.rsplit('/').next().unwrap_or(s)
}

/// The program name a `proc_name` stands for ([`crate::spec::ProcSpec::program_name`]).
pub fn program_name(proc_name: &str) -> Option<&str> {
    crate::spec::program_name(proc_name)
}

/// Interpreters whose first argument is the program (`sh ./daemon.sh`, `python3 app.py`).
fn is_interpreter(name: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "sh", "bash", "dash", "ksh", "zsh", "busybox", "python", "perl", "ruby", "node", "php",
        "lua", "java",
    ];
    PREFIXES.iter().any(|p| {
        name.strip_prefix(p)
            .is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit() || c == '.'))
    })
}

/// Does the process carry the program name `want` (point 3)?
pub fn name_matches(p: &ProcFacts, want: &str) -> bool {
    // comm is cut to 15 bytes by the kernel.
    let comm_ok = p.comm == want || (p.comm.len() >= 15 && want.starts_with(p.comm.as_str()));
    if comm_ok || p.exe.as_deref().map(basename) == Some(want) {
        return true;
    }
    let arg = |a: &str| -> String {
        // A daemon that rewrites its title ("nginx: master process") keeps its name first.
        let first = a.split_whitespace().next().unwrap_or("");
        basename(first).trim_end_matches(':').to_string()
    };
    match p.argv.first().map(|a| arg(a)) {
        Some(a0) if a0 == want => true,
        Some(a0) if is_interpreter(&a0) => p.argv.get(1).is_some_and(|a1| arg(a1) == want),
        _ => false,
    }
}

fn under(path: &str, dir: &str) -> bool {
    let d = dir.trim_end_matches('/');
    if d.is_empty() {
        return path.starts_with('/');
    }
    path == d || path.strip_prefix(d).is_some_and(|r| r.starts_with('/'))
}

/// The rule (module docs). `Ok` carries the origin that proved ownership.
pub fn check(
    p: &ProcFacts,
    owner: &Owner<'_>,
    ev: &Evidence<'_>,
    role: Role,
) -> Result<Origin, NotOwned> {
    // 1. Never the agent, init, a kernel thread, a zombie, or another definition's process.
    if p.exited {
        return Err(NotOwned::Gone(p.pid));
    }
    if p.pid <= 1 {
        return Err(NotOwned::Forbidden {
            pid: p.pid,
            what: "init",
        });
    }
    if p.pid == ev.agent_pid {
        return Err(NotOwned::Forbidden {
            pid: p.pid,
            what: "the agent itself",
        });
    }
    if p.kernel_thread || p.pid == 2 {
        return Err(NotOwned::Forbidden {
            pid: p.pid,
            what: "a kernel thread",
        });
    }
    if ev.tracked_elsewhere {
        return Err(NotOwned::TrackedElsewhere(p.pid));
    }
    // 5. Never a process another definition's cgroup holds.
    if ev.cgroup == CgroupFact::Other {
        return Err(NotOwned::OtherCgroup(p.pid));
    }
    // 2. Account.
    if owner.uid != 0 && p.uid != Some(owner.uid) {
        return Err(NotOwned::Account {
            pid: p.pid,
            uid: p.uid,
            want: owner.uid,
        });
    }
    if p.uid.is_none() {
        return Err(NotOwned::Account {
            pid: p.pid,
            uid: None,
            want: owner.uid,
        });
    }
    if role == Role::Member {
        return Ok(Origin::Tree);
    }
    // 4. Origin (checked before the name: it decides whether the command is the process).
    let spawned = ev.spawns.iter().find(|s| {
        p.starttime >= s.ticks
            && (p.pid == s.shell
                || p.session == s.shell
                || p.pgrp == s.shell
                || ev.ancestors.contains(&s.shell)
                || p.lineage == Some(s.token))
    });
    let recorded = ev
        .recorded
        .iter()
        .any(|(pid, start)| *pid == p.pid && *start == p.starttime);
    let in_tree = |path: &Option<String>| {
        path.as_deref().is_some_and(|x| {
            under(x, owner.setup_path) || ev.setup_real.is_some_and(|r| under(x, r))
        })
    };
    let origin = if let Some(s) = spawned {
        Some((Origin::Spawned, s.shell == p.pid))
    } else if ev.cgroup == CgroupFact::Own {
        // Only the definition's commands start processes in its cgroups.
        Some((Origin::Spawned, false))
    } else if recorded {
        Some((Origin::Recorded, !owner.has_pid_file))
    } else if in_tree(&p.exe) || in_tree(&p.cwd) {
        Some((Origin::SetupPath, false))
    } else {
        None
    };
    // 3. Name.
    let want = program_name(owner.proc_name).ok_or(NotOwned::EmptyName)?;
    let command_is_process = !owner.has_pid_file && origin.is_some_and(|(_, own)| own);
    if !command_is_process && !name_matches(p, want) {
        return Err(NotOwned::Name {
            pid: p.pid,
            comm: p.comm.clone(),
            want: want.to_string(),
        });
    }
    origin
        .map(|(o, _)| o)
        .ok_or(NotOwned::Origin { pid: p.pid })
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: i32 = 500;

    fn facts() -> ProcFacts {
        ProcFacts {
            pid: 1000,
            ppid: 999,
            pgrp: 1000,
            session: 1000,
            starttime: 5000,
            comm: "app".into(),
            exited: false,
            kernel_thread: false,
            uid: Some(1001),
            exe: Some("/opt/app/bin/app".into()),
            cwd: Some("/".into()),
            argv: vec!["/opt/app/bin/app".into(), "--daemon".into()],
            lineage: None,
        }
    }

    fn owner(uid: u32) -> Owner<'static> {
        Owner {
            uid,
            proc_name: "app",
            setup_path: "/opt/app",
            has_pid_file: true,
        }
    }

    fn ev() -> Evidence<'static> {
        Evidence {
            agent_pid: AGENT,
            ..Evidence::default()
        }
    }

    #[test]
    fn program_names() {
        for (p, want) in [
            ("app", Some("app")),
            ("/opt/app/bin/app", Some("app")),
            (" app ", Some("app")),
            ("/", None),
            (".", None),
            ("", None),
            ("  ", None),
            ("dir/", None),
            ("..", None),
        ] {
            assert_eq!(program_name(p), want, "{p:?}");
        }
    }

    #[test]
    fn the_rule_table() {
        static SPAWN: [Spawn; 1] = [Spawn {
            shell: 900,
            ticks: 4000,
            token: 77,
        }];
        static LATE_SPAWN: [Spawn; 1] = [Spawn {
            shell: 900,
            ticks: 6000,
            token: 77,
        }];
        let f = facts;
        type Case = (
            &'static str,
            ProcFacts,
            Owner<'static>,
            Evidence<'static>,
            Result<Origin, &'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "from its setup_path",
                f(),
                owner(1001),
                ev(),
                Ok(Origin::SetupPath),
            ),
            (
                "cwd under setup_path",
                ProcFacts {
                    exe: Some("/usr/bin/app".into()),
                    cwd: Some("/opt/app/run".into()),
                    ..f()
                },
                owner(1001),
                ev(),
                Ok(Origin::SetupPath),
            ),
            (
                "setup_path is a prefix but not a parent",
                ProcFacts {
                    exe: Some("/opt/application/app".into()),
                    ..f()
                },
                owner(1001),
                ev(),
                Err("origin"),
            ),
            (
                "an unrelated same-name program elsewhere",
                ProcFacts {
                    exe: Some("/usr/bin/app".into()),
                    ..f()
                },
                owner(0),
                ev(),
                Err("origin"),
            ),
            (
                "another account's process",
                ProcFacts {
                    uid: Some(0),
                    ..f()
                },
                owner(1001),
                ev(),
                Err("account"),
            ),
            (
                "a root definition owns a daemon that dropped to another user",
                f(),
                owner(0),
                ev(),
                Ok(Origin::SetupPath),
            ),
            (
                "account unreadable",
                ProcFacts { uid: None, ..f() },
                owner(0),
                ev(),
                Err("account"),
            ),
            (
                "init",
                ProcFacts { pid: 1, ..f() },
                owner(0),
                ev(),
                Err("forbidden"),
            ),
            (
                "the agent",
                ProcFacts { pid: AGENT, ..f() },
                owner(0),
                ev(),
                Err("forbidden"),
            ),
            (
                "a kernel thread",
                ProcFacts {
                    kernel_thread: true,
                    ..f()
                },
                owner(0),
                ev(),
                Err("forbidden"),
            ),
            (
                "a zombie",
                ProcFacts {
                    exited: true,
                    ..f()
                },
                owner(0),
                ev(),
                Err("gone"),
            ),
            (
                "tracked under another key",
                f(),
                owner(1001),
                Evidence {
                    tracked_elsewhere: true,
                    ..ev()
                },
                Err("elsewhere"),
            ),
            (
                "wrong name",
                ProcFacts {
                    comm: "other".into(),
                    exe: Some("/opt/app/bin/other".into()),
                    argv: vec!["other".into()],
                    ..f()
                },
                owner(1001),
                ev(),
                Err("name"),
            ),
            (
                "empty program name",
                f(),
                Owner {
                    proc_name: "/",
                    ..owner(0)
                },
                ev(),
                Err("empty"),
            ),
            (
                "its start command's session",
                ProcFacts {
                    exe: Some("/usr/bin/app".into()),
                    session: 900,
                    ..f()
                },
                owner(1001),
                Evidence {
                    spawns: &SPAWN,
                    ..ev()
                },
                Ok(Origin::Spawned),
            ),
            (
                "in another definition's cgroup, though its lineage is ours",
                ProcFacts {
                    lineage: Some(77),
                    ..f()
                },
                owner(1001),
                Evidence {
                    spawns: &SPAWN,
                    cgroup: CgroupFact::Other,
                    ..ev()
                },
                Err("cgroup"),
            ),
            (
                "outside every cgroup, from its setup_path: owned (and moved in by the caller)",
                f(),
                owner(1001),
                Evidence {
                    cgroup: CgroupFact::Outside,
                    ..ev()
                },
                Ok(Origin::SetupPath),
            ),
            (
                "a double-forked orphan reparented to the agent, with the command's lineage",
                ProcFacts {
                    exe: Some("/usr/bin/app".into()),
                    ppid: AGENT,
                    lineage: Some(77),
                    ..f()
                },
                owner(1001),
                Evidence {
                    spawns: &SPAWN,
                    ..ev()
                },
                Ok(Origin::Spawned),
            ),
            (
                "an orphan of another definition's command, reparented to the agent",
                ProcFacts {
                    exe: Some("/usr/bin/app".into()),
                    ppid: AGENT,
                    lineage: Some(78),
                    ..f()
                },
                owner(0),
                Evidence {
                    spawns: &SPAWN,
                    ..ev()
                },
                Err("origin"),
            ),
            (
                "an orphan reparented to the agent, with no lineage",
                ProcFacts {
                    exe: Some("/usr/bin/app".into()),
                    ppid: AGENT,
                    ..f()
                },
                owner(0),
                Evidence {
                    spawns: &SPAWN,
                    ..ev()
                },
                Err("origin"),
            ),
            (
                "the command's lineage, but older than the command",
                ProcFacts {
                    exe: Some("/usr/bin/app".into()),
                    lineage: Some(77),
                    ..f()
                },
                owner(1001),
                Evidence {
                    spawns: &LATE_SPAWN,
                    ..ev()
                },
                Err("origin"),
            ),
            (
                "a descendant by parent links",
                ProcFacts {
                    exe: Some("/usr/bin/app".into()),
                    ..f()
                },
                owner(1001),
                Evidence {
                    spawns: &SPAWN,
                    ancestors: &[950, 900, AGENT],
                    ..ev()
                },
                Ok(Origin::Spawned),
            ),
            (
                "older than the command: not started by it",
                ProcFacts {
                    exe: Some("/usr/bin/app".into()),
                    session: 900,
                    ..f()
                },
                owner(1001),
                Evidence {
                    spawns: &LATE_SPAWN,
                    ..ev()
                },
                Err("origin"),
            ),
            (
                "recorded before a restart",
                ProcFacts {
                    exe: Some("/usr/bin/app".into()),
                    ..f()
                },
                owner(1001),
                Evidence {
                    recorded: &[(1000, 5000)],
                    ..ev()
                },
                Ok(Origin::Recorded),
            ),
            (
                "same pid, another start time: a reused pid",
                ProcFacts {
                    exe: Some("/usr/bin/app".into()),
                    ..f()
                },
                owner(1001),
                Evidence {
                    recorded: &[(1000, 4999)],
                    ..ev()
                },
                Err("origin"),
            ),
            (
                "no pid file: the command's own process needs no name",
                ProcFacts {
                    pid: 900,
                    comm: "sleep".into(),
                    exe: Some("/usr/bin/sleep".into()),
                    argv: vec!["sleep".into()],
                    ..f()
                },
                Owner {
                    has_pid_file: false,
                    ..owner(1001)
                },
                Evidence {
                    spawns: &SPAWN,
                    ..ev()
                },
                Ok(Origin::Spawned),
            ),
            (
                "no pid file: a recorded command process needs no name either",
                ProcFacts {
                    comm: "sleep".into(),
                    exe: Some("/usr/bin/sleep".into()),
                    argv: vec!["sleep".into()],
                    ..f()
                },
                Owner {
                    has_pid_file: false,
                    ..owner(1001)
                },
                Evidence {
                    recorded: &[(1000, 5000)],
                    ..ev()
                },
                Ok(Origin::Recorded),
            ),
            (
                "with a pid file the command's descendants must carry the name",
                ProcFacts {
                    comm: "sleep".into(),
                    exe: Some("/usr/bin/sleep".into()),
                    argv: vec!["sleep".into()],
                    session: 900,
                    ..f()
                },
                owner(1001),
                Evidence {
                    spawns: &SPAWN,
                    ..ev()
                },
                Err("name"),
            ),
        ];
        for (what, p, o, e, want) in cases {
            let got = check(&p, &o, &e, Role::Main).map_err(|n| match n {
                NotOwned::Gone(_) => "gone",
                NotOwned::Forbidden { .. } => "forbidden",
                NotOwned::TrackedElsewhere(_) => "elsewhere",
                NotOwned::OtherCgroup(_) => "cgroup",
                NotOwned::Account { .. } => "account",
                NotOwned::EmptyName => "empty",
                NotOwned::Name { .. } => "name",
                NotOwned::Origin { .. } => "origin",
            });
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn members_need_points_one_and_two_only() {
        let worker = ProcFacts {
            comm: "worker".into(),
            exe: Some("/usr/bin/worker".into()),
            ..facts()
        };
        assert_eq!(
            check(&worker, &owner(1001), &ev(), Role::Member),
            Ok(Origin::Tree)
        );
        let foreign = ProcFacts {
            uid: Some(0),
            ..worker.clone()
        };
        assert!(check(&foreign, &owner(1001), &ev(), Role::Member).is_err());
        let agent = ProcFacts {
            pid: AGENT,
            ..worker
        };
        assert!(check(&agent, &owner(0), &ev(), Role::Member).is_err());
    }

    #[test]
    fn names_by_comm_exe_argv_and_interpreter_script() {
        let p = |comm: &str, exe: &str, argv: &[&str]| ProcFacts {
            comm: comm.into(),
            exe: Some(exe.into()),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..facts()
        };
        let cases = [
            (p("app", "/x/y", &["z"]), "app", true),
            (p("x", "/opt/app", &["z"]), "app", true),
            (p("x", "/y", &["/opt/app", "a"]), "app", true),
            (p("nginx", "/y", &["nginx: master process"]), "nginx", true),
            (p("x", "/y", &["nginx:", "master"]), "nginx", true),
            (
                p("python3", "/usr/bin/python3.11", &["python3", "app.py"]),
                "app.py",
                true,
            ),
            (
                p("sh", "/bin/dash", &["/bin/sh", "./daemon.sh"]),
                "daemon.sh",
                true,
            ),
            (p("x", "/y", &["/opt/tool", "app"]), "app", false),
            (
                p("averyveryverylo", "/y", &["z"]),
                "averyveryverylongname",
                true,
            ),
            (p("short", "/y", &["z"]), "shortish", false),
        ];
        for (f, want, ok) in cases {
            assert_eq!(name_matches(&f, want), ok, "{f:?} {want}");
        }
    }
}
