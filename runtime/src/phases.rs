//! Where the time of one operation (create, start, exec, delete) went:
//! named steps, each on the clock that measured it. The host's steps are
//! timed here; the guest's come from the agent's own clock (its replies
//! carry them) and are shown beside them, never trusted for anything but
//! display: their names are checked and their count and length bounded.

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Which side measured a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Clock {
    Host,
    Guest,
}

/// One step of an operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub clock: Clock,
    pub name: String,
    pub ms: f64,
}

/// The steps of one operation, in order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Phases {
    pub steps: Vec<Step>,
}

/// The most guest steps one reply may add (the agent reports a handful).
pub const MAX_GUEST_STEPS: usize = 16;
/// The longest guest step name kept.
const MAX_GUEST_NAME: usize = 32;

impl Phases {
    pub fn push(&mut self, clock: Clock, name: impl Into<String>, d: Duration) {
        self.steps.push(Step {
            clock,
            name: name.into(),
            ms: d.as_secs_f64() * 1000.0,
        });
    }

    /// Adds the steps a guest reported, under `prefix`: at most
    /// [`MAX_GUEST_STEPS`], each name cut to printable ASCII.
    pub fn push_guest<'a>(
        &mut self,
        prefix: &str,
        steps: impl IntoIterator<Item = (&'a str, u64)>,
    ) {
        for (name, ns) in steps.into_iter().take(MAX_GUEST_STEPS) {
            let name: String = name
                .chars()
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .take(MAX_GUEST_NAME)
                .collect();
            self.steps.push(Step {
                clock: Clock::Guest,
                name: format!("{prefix}{name}"),
                ms: ns as f64 / 1e6,
            });
        }
    }

    pub fn extend(&mut self, other: Phases) {
        self.steps.extend(other.steps);
    }

    /// Total of the host's steps (the guest's run inside some of them).
    pub fn host_total_ms(&self) -> f64 {
        self.steps
            .iter()
            .filter(|s| s.clock == Clock::Host)
            .map(|s| s.ms)
            .sum()
    }

    /// One line per step, `phase <operation> <clock> <name> <ms> ms`: the
    /// form `husk --debug` logs and `make bench` reads.
    pub fn lines(&self, operation: &str) -> Vec<String> {
        self.steps
            .iter()
            .map(|s| {
                let clock = match s.clock {
                    Clock::Host => "host",
                    Clock::Guest => "guest",
                };
                format!("phase {operation} {clock} {} {:.2} ms", s.name, s.ms)
            })
            .collect()
    }

    /// Logs the steps at debug level (`husk --debug`).
    pub fn log(&self, operation: &str) {
        for line in self.lines(operation) {
            log::debug!("{line}");
        }
    }
}

/// Times consecutive host steps: each `lap` is the time since the last.
#[derive(Debug)]
pub struct Stopwatch {
    phases: Phases,
    last: Instant,
}

impl Default for Stopwatch {
    fn default() -> Self {
        Self::new()
    }
}

impl Stopwatch {
    pub fn new() -> Self {
        Stopwatch {
            phases: Phases::default(),
            last: Instant::now(),
        }
    }

    /// Ends the step `name`, started at the previous lap.
    pub fn lap(&mut self, name: &str) {
        let now = Instant::now();
        self.phases.push(Clock::Host, name, now - self.last);
        self.last = now;
    }

    /// Adds steps measured elsewhere (they do not move the lap).
    pub fn add(&mut self, phases: Phases) {
        self.phases.extend(phases);
    }

    pub fn finish(self) -> Phases {
        self.phases
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_steps_are_bounded_and_cleaned() {
        let mut p = Phases::default();
        let long = "x".repeat(100);
        let steps: Vec<(&str, u64)> = (0..40)
            .map(|i| {
                if i == 0 {
                    ("bad\nname\u{1b}[31m", 1_500_000)
                } else {
                    (long.as_str(), 1)
                }
            })
            .collect();
        p.push_guest("create: ", steps);
        assert_eq!(p.steps.len(), MAX_GUEST_STEPS);
        assert_eq!(p.steps[0].name, "create: badname[31m");
        assert_eq!(p.steps[0].ms, 1.5);
        assert_eq!(p.steps[1].name.len(), "create: ".len() + MAX_GUEST_NAME);
        assert!(p.steps.iter().all(|s| s.clock == Clock::Guest));
    }

    #[test]
    fn laps_follow_each_other_and_lines_parse() {
        let mut w = Stopwatch::new();
        std::thread::sleep(Duration::from_millis(5));
        w.lap("first");
        w.lap("second");
        let p = w.finish();
        assert_eq!(p.steps.len(), 2);
        assert!(p.steps[0].ms >= 5.0);
        assert!(p.steps[1].ms < p.steps[0].ms);
        let lines = p.lines("create");
        assert!(lines[0].starts_with("phase create host first "));
        assert!(lines[0].ends_with(" ms"));
        assert!((p.host_total_ms() - p.steps[0].ms - p.steps[1].ms).abs() < 1e-9);
    }
}
