//! procagent: a host-side process supervisor that speaks Tencent BlueKing GSE's process APIs
//! over a local unix socket.
//!
//! # Layout
//! * [`config`]: the TOML config, strict, every error reported at once.
//! * [`spec`]: process definitions (key + GSE spec), the one spec decoder (a patch applied
//!   over a base, every check made once) and the one identity function.
//! * [`proto`]: the API's request/response types, shared by server, CLI and tests.
//! * [`store`]: SQLite persistence (one writer thread, WAL, group commit).
//! * [`supervisor`]: owns every process's state; its [`supervisor::lifecycle`] is the pure state
//!   machine every transition goes through, the rest feeds it and carries out its effects.
//! * [`cgroup`]: containment: the agent's cgroup v2 subtree and each process's cgroups.
//! * [`executor`]: running control commands as an account, in their own session, output captured.
//! * [`output`]: output capture: the output keeper process (pipes, records, rotation) and the agent's client.
//! * [`reserve`]: the space reserve in the state directory that keeps stop, kill and unmanage durable on a full disk.
//! * [`reaper`]: the one reaper (the agent is a child subreaper); exits filed by (pid, start time).
//! * [`expr`]: GSEKit expression_scope expressions.
//! * [`procinfo`]: `/proc` identity reads and the pid-file parser.
//! * [`tasks`], [`events`]: the task book (ids, per-item results) and the event history.
//! * [`host`], [`util`]: this host's identity; small shared helpers.
//! * [`fspool`]: the bounded pool for file-system work on caller-chosen paths (hung mounts).
//! * `fuzzing` (feature `fuzzing`): the fuzz harness, outside the default build.
//! * [`probe`]: resource sampling and metrics; [`sockdiag`] the host's TCP/UDP socket dump
//!   (netlink sock_diag) and [`nettally`] the network figures of a process tree from it.
//! * [`api`]: the HTTP/1.1 + JSON socket server, authorization, and the client.
//! * [`cli`]: the `procagent` command.
//! * [`daemon`]: [`daemon::run`], the entry point the binary and the tests share;
//!   [`daemon_cli`] the daemon's command line (also the source of procagentd(8)).
//! * [`sys`]: the only module with `unsafe` (pidfds, pre_exec, subreaper).
#![deny(unsafe_code)]

pub mod api;
pub mod cgroup;
pub mod cgwatch;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod daemon_cli;
pub mod events;
pub mod executor;
pub mod expr;
pub mod fspool;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod host;
pub mod nettally;
pub mod output;
pub mod probe;
pub mod procinfo;
pub mod proto;
pub mod reaper;
pub mod reserve;
pub mod sockdiag;
pub mod spec;
pub mod store;
pub mod supervisor;
pub mod sys;
pub mod tasks;
pub mod util;
