//! Background probes: a process's health command (failing `supervisor.health_failures`
//! times in a row makes a managed process a liveness failure, stopped and restarted by its
//! lifecycle) and its version command. They run on their own budget ([`super::MAX_PROBES`]
//! at once), so they can neither fork a shell per process at the same moment nor take the
//! permits of operations.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lifecycle::{Input, State};
use super::{Engine, policy};
use crate::spec::{CommandKind, ProcKey};

impl Engine {
    /// Start the health checks that are due: processes with a `health_cmd` that run, are
    /// not held, have no check running, once per `supervisor.health_interval`.
    pub(crate) fn schedule_health_checks(self: &Arc<Self>) {
        let interval = self.config.supervisor.health_interval;
        let now = Instant::now();
        let due: Vec<ProcKey> = {
            let mut reg = self.reg();
            reg.entries
                .values_mut()
                .filter(|e| {
                    let running = e
                        .life
                        .instances
                        .iter()
                        .any(|i| matches!(i.state, State::Running { .. }));
                    policy::health_due(
                        e.def.spec.command(CommandKind::Health).is_some() && e.invalid.is_none(),
                        running,
                        e.life.busy() || e.health.running,
                        e.health.last,
                        interval,
                        now,
                    )
                })
                .map(|e| {
                    e.health.running = true;
                    e.health.last = Some(now);
                    e.def.key.clone()
                })
                .collect()
        };
        for key in due {
            tokio::spawn(self.clone().health_check(key));
        }
    }

    /// Run a process's `health_cmd` once and act on the verdict.
    async fn health_check(self: Arc<Self>, key: ProcKey) {
        let spec = self.spec_of(&key);
        let cmd = spec
            .as_ref()
            .and_then(|s| s.command(CommandKind::Health).map(str::to_string));
        let (Some(spec), Some(cmd)) = (spec, cmd) else {
            if let Some(e) = self.reg().get_mut(&key) {
                e.health.running = false;
            }
            return;
        };
        let permit = self.probes.clone().acquire_owned().await;
        let req = self.command_request(&key, &spec, "health_cmd", &cmd);
        let (passed, text) = match self.exec.run(&req).await {
            Ok(fin) if fin.success() => (true, "ok".to_string()),
            Ok(fin) if fin.timed_out => (
                false,
                format!("timed out after op_timeout {}s", spec.op_timeout),
            ),
            Ok(fin) => (
                false,
                format!(
                    "{}: {}",
                    fin.exit,
                    crate::util::tail_bounded(fin.output.trim(), 512)
                ),
            ),
            Err(e) => (false, e.to_string()),
        };
        drop(permit);
        let threshold = self.config.supervisor.health_failures;
        let (failures, dead) = {
            let mut reg = self.reg();
            let Some(e) = reg.get_mut(&key) else { return };
            e.health.running = false;
            let (n, dead) = policy::health_verdict(e.health.failures, passed, threshold);
            e.health.failures = n;
            let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            e.health.text = Some(if passed {
                format!("ok at {when}")
            } else {
                format!("failed {n}/{threshold} at {when}: {text}")
            });
            if dead {
                e.health.failures = 0;
            }
            (n, dead)
        };
        if passed {
            return;
        }
        self.events.emit(
            Some(&key),
            "health_check_failed",
            format!("health_cmd failed ({failures} of {threshold} in a row): {text}"),
            serde_json::json!({"failures": failures, "threshold": threshold}),
        );
        if dead {
            self.feed_running(
                &key,
                Input::HealthFailed {
                    why: format!("health_cmd failed {failures} times in a row"),
                },
            );
        }
    }

    /// Run `version_cmd` in the background and keep its first output line.
    pub fn refresh_version(self: &Arc<Self>, key: &ProcKey) {
        if let Some(spec) = self.spec_of(key) {
            self.refresh_version_of(key, &spec);
        }
    }

    /// As [`Engine::refresh_version`], with the spec at hand (for a caller holding the
    /// registry's lock).
    pub(crate) fn refresh_version_of(
        self: &Arc<Self>,
        key: &ProcKey,
        spec: &crate::spec::ProcSpec,
    ) {
        let Some(cmd) = spec.command(CommandKind::Version) else {
            return;
        };
        let mut req = self.command_request(key, spec, "version_cmd", cmd);
        req.timeout = req.timeout.min(Duration::from_secs(30));
        let engine = self.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let permit = engine.probes.clone().acquire_owned().await;
            let r = engine.exec.run(&req).await;
            drop(permit);
            if let Ok(fin) = r
                && fin.success()
            {
                let v = fin
                    .output
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .unwrap_or("")
                    .to_string();
                let v: String = v.chars().take(128).collect();
                if let Some(e) = engine.reg().get_mut(&key) {
                    e.version = v;
                }
            }
        });
    }
}
