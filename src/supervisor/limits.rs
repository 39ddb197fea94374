//! Pure resource-limit decisions: is a process over its `cpu_lmt` / `mem_lmt`, and has it
//! stayed over long enough that the agent must stop it?
//!
//! Units (as GSE documents them, and docs/api.md states):
//! * `cpu_lmt` (`spec.resource.cpu`): percent of the **whole machine**, all cores together
//!   ("30" is 30 % of all cores). A sample's `cpu_usage` is percent of one core, so the check
//!   compares `cpu_usage / cpus` with it.
//! * `mem_lmt` (`spec.resource.mem`): percent of `MemTotal`, compared with `mem_usage`.
//! * 0 (or absent) means no limit.
//!
//! A process is acted on after `needed` consecutive samples over a limit (either limit); one
//! sample under both limits resets the count. Only processes the agent manages, that are
//! running and that no operation holds, are counted; anything else resets the count too.

/// What the check needs to know about one process at one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Input {
    /// Managed, running, and no operation (or supervisor start) holds it.
    pub eligible: bool,
    /// Percent of one core (sum over instances).
    pub cpu_usage: f64,
    /// Percent of MemTotal.
    pub mem_usage: f64,
    /// Percent of the whole machine; 0 = no limit.
    pub cpu_lmt: f64,
    /// Percent of MemTotal; 0 = no limit.
    pub mem_lmt: f64,
    /// Logical CPUs of the host.
    pub cpus: usize,
    /// Consecutive samples over a limit before this one.
    pub over_limit: u32,
    /// Consecutive samples over a limit that make the agent act (at least 1).
    pub needed: u32,
}

/// A process that stayed over a limit: the figures of the sample that decided it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Breach {
    /// Percent of one core, as reported.
    pub cpu_usage: f64,
    /// The same as percent of the whole machine (what `cpu_lmt` is compared with).
    pub cpu_machine: f64,
    pub mem_usage: f64,
    pub cpu_lmt: f64,
    pub mem_lmt: f64,
    pub cpu_over: bool,
    pub mem_over: bool,
    /// Consecutive samples it was over.
    pub samples: u32,
}

impl Breach {
    /// One line for events and status: which limit, the figure and the limit, how long.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.mem_over {
            parts.push(format!(
                "memory {:.2}% of MemTotal over mem_lmt {}%",
                self.mem_usage, self.mem_lmt
            ));
        }
        if self.cpu_over {
            parts.push(format!(
                "cpu {:.2}% of the machine ({:.1}% of one core) over cpu_lmt {}%",
                self.cpu_machine, self.cpu_usage, self.cpu_lmt
            ));
        }
        format!(
            "{} for {} consecutive samples",
            parts.join(" and "),
            self.samples
        )
    }

    /// The figures as event data.
    pub fn data(&self) -> serde_json::Value {
        serde_json::json!({
            "cpu_usage": self.cpu_usage,
            "cpu_machine_percent": self.cpu_machine,
            "mem_usage": self.mem_usage,
            "cpu_lmt": self.cpu_lmt,
            "mem_lmt": self.mem_lmt,
            "cpu_over": self.cpu_over,
            "mem_over": self.mem_over,
            "samples": self.samples,
        })
    }
}

/// The new over-limit count, and the breach when the agent must act now (the count then
/// starts again from 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    pub over_limit: u32,
    pub breach: Option<Breach>,
}

/// Decide for one sample.
pub fn check(i: &Input) -> Verdict {
    let quiet = Verdict {
        over_limit: 0,
        breach: None,
    };
    if !i.eligible {
        return quiet;
    }
    let cpu_machine = i.cpu_usage / i.cpus.max(1) as f64;
    // NaN compares false: an unreadable figure is never "over".
    let cpu_over = i.cpu_lmt > 0.0 && cpu_machine > i.cpu_lmt;
    let mem_over = i.mem_lmt > 0.0 && i.mem_usage > i.mem_lmt;
    if !cpu_over && !mem_over {
        return quiet;
    }
    let n = i.over_limit.saturating_add(1);
    if n < i.needed.max(1) {
        return Verdict {
            over_limit: n,
            breach: None,
        };
    }
    Verdict {
        over_limit: 0,
        breach: Some(Breach {
            cpu_usage: i.cpu_usage,
            cpu_machine,
            mem_usage: i.mem_usage,
            cpu_lmt: i.cpu_lmt,
            mem_lmt: i.mem_lmt,
            cpu_over,
            mem_over,
            samples: n,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Input {
        Input {
            eligible: true,
            cpu_usage: 0.0,
            mem_usage: 0.0,
            cpu_lmt: 0.0,
            mem_lmt: 0.0,
            cpus: 2,
            over_limit: 0,
            needed: 3,
        }
    }

    /// (input, expected count, expected breach as (cpu_over, mem_over, samples)).
    #[test]
    fn check_table() {
        type Want = (u32, Option<(bool, bool, u32)>);
        let cases: Vec<(&str, Input, Want)> = vec![
            (
                "no limits",
                Input {
                    cpu_usage: 190.0,
                    mem_usage: 90.0,
                    ..base()
                },
                (0, None),
            ),
            (
                "mem under",
                Input {
                    mem_usage: 9.9,
                    mem_lmt: 10.0,
                    ..base()
                },
                (0, None),
            ),
            (
                "mem equal is not over",
                Input {
                    mem_usage: 10.0,
                    mem_lmt: 10.0,
                    ..base()
                },
                (0, None),
            ),
            (
                "mem over, first",
                Input {
                    mem_usage: 10.1,
                    mem_lmt: 10.0,
                    ..base()
                },
                (1, None),
            ),
            (
                "mem over, second",
                Input {
                    mem_usage: 11.0,
                    mem_lmt: 10.0,
                    over_limit: 1,
                    ..base()
                },
                (2, None),
            ),
            (
                "mem over, third: act",
                Input {
                    mem_usage: 11.0,
                    mem_lmt: 10.0,
                    over_limit: 2,
                    ..base()
                },
                (0, Some((false, true, 3))),
            ),
            (
                "under resets",
                Input {
                    mem_usage: 1.0,
                    mem_lmt: 10.0,
                    over_limit: 2,
                    ..base()
                },
                (0, None),
            ),
            // cpu_lmt is percent of the whole machine: 100% of one core on 2 cores is 50%.
            (
                "cpu one core of two vs 60%",
                Input {
                    cpu_usage: 100.0,
                    cpu_lmt: 60.0,
                    ..base()
                },
                (0, None),
            ),
            (
                "cpu one core of two vs 40%",
                Input {
                    cpu_usage: 100.0,
                    cpu_lmt: 40.0,
                    ..base()
                },
                (1, None),
            ),
            (
                "cpu on 4 cores",
                Input {
                    cpu_usage: 100.0,
                    cpu_lmt: 20.0,
                    cpus: 4,
                    over_limit: 2,
                    ..base()
                },
                (0, Some((true, false, 3))),
            ),
            (
                "both over",
                Input {
                    cpu_usage: 200.0,
                    cpu_lmt: 50.0,
                    mem_usage: 5.0,
                    mem_lmt: 1.0,
                    over_limit: 2,
                    ..base()
                },
                (0, Some((true, true, 3))),
            ),
            (
                "cpu over, mem under: still counts",
                Input {
                    cpu_usage: 200.0,
                    cpu_lmt: 50.0,
                    mem_usage: 0.5,
                    mem_lmt: 1.0,
                    ..base()
                },
                (1, None),
            ),
            (
                "not eligible resets",
                Input {
                    eligible: false,
                    mem_usage: 50.0,
                    mem_lmt: 1.0,
                    over_limit: 2,
                    ..base()
                },
                (0, None),
            ),
            (
                "needed 1 acts at once",
                Input {
                    mem_usage: 50.0,
                    mem_lmt: 1.0,
                    needed: 1,
                    ..base()
                },
                (0, Some((false, true, 1))),
            ),
            (
                "needed 0 acts like 1",
                Input {
                    mem_usage: 50.0,
                    mem_lmt: 1.0,
                    needed: 0,
                    ..base()
                },
                (0, Some((false, true, 1))),
            ),
            (
                "NaN is never over",
                Input {
                    cpu_usage: f64::NAN,
                    cpu_lmt: 10.0,
                    mem_usage: f64::NAN,
                    mem_lmt: 1.0,
                    ..base()
                },
                (0, None),
            ),
            (
                "zero cpus treated as one",
                Input {
                    cpu_usage: 100.0,
                    cpu_lmt: 90.0,
                    cpus: 0,
                    ..base()
                },
                (1, None),
            ),
            (
                "count saturates",
                Input {
                    mem_usage: 50.0,
                    mem_lmt: 1.0,
                    over_limit: u32::MAX,
                    needed: u32::MAX,
                    ..base()
                },
                (0, Some((false, true, u32::MAX))),
            ),
        ];
        for (what, input, (count, breach)) in cases {
            let v = check(&input);
            assert_eq!(v.over_limit, count, "{what}: {v:?}");
            assert_eq!(
                v.breach.map(|b| (b.cpu_over, b.mem_over, b.samples)),
                breach,
                "{what}: {v:?}"
            );
        }
    }

    #[test]
    fn breach_figures_and_text() {
        let v = check(&Input {
            cpu_usage: 150.0,
            cpu_lmt: 50.0,
            mem_usage: 12.5,
            mem_lmt: 10.0,
            over_limit: 2,
            ..base()
        });
        let b = v.breach.expect("breach");
        assert_eq!(b.cpu_machine, 75.0);
        let text = b.describe();
        assert!(
            text.contains("memory 12.50% of MemTotal over mem_lmt 10%"),
            "{text}"
        );
        assert!(
            text.contains("cpu 75.00% of the machine (150.0% of one core) over cpu_lmt 50%"),
            "{text}"
        );
        assert!(text.ends_with("for 3 consecutive samples"), "{text}");
        assert_eq!(b.data()["mem_usage"], serde_json::json!(12.5));
    }

    /// Feeding samples one by one: acts every `needed` samples while over, never when a dip
    /// interrupts the run.
    #[test]
    fn runs_of_samples() {
        let over = |mem: f64, n: u32| Input {
            mem_usage: mem,
            mem_lmt: 10.0,
            over_limit: n,
            ..base()
        };
        let mut n = 0;
        let mut acted = Vec::new();
        let series = [20.0, 20.0, 5.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 1.0];
        for (idx, mem) in series.iter().enumerate() {
            let v = check(&over(*mem, n));
            n = v.over_limit;
            if v.breach.is_some() {
                acted.push(idx);
            }
        }
        assert_eq!(acted, vec![5, 8]);
    }
}
