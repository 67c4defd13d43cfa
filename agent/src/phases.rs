//! The agent's own clock on a request's steps: returned in the reply so
//! that `husk --debug` and `make bench` show where the guest's time went.

use husk_protocol::agent::Phase;
use std::time::Instant;

/// Consecutive steps: each `lap` is the time since the previous one.
pub struct Laps {
    last: Instant,
    steps: Vec<Phase>,
}

impl Default for Laps {
    fn default() -> Self {
        Self::new()
    }
}

impl Laps {
    pub fn new() -> Self {
        Laps {
            last: Instant::now(),
            steps: Vec::new(),
        }
    }

    pub fn lap(&mut self, name: &str) {
        let now = Instant::now();
        self.push(name, (now - self.last).as_nanos());
        self.last = now;
    }

    /// A step measured elsewhere (it does not move the lap).
    pub fn push(&mut self, name: &str, ns: u128) {
        self.steps.push(Phase {
            name: name.to_string(),
            ns: u64::try_from(ns).unwrap_or(u64::MAX),
            ..Default::default()
        });
    }

    pub fn into_steps(self) -> Vec<Phase> {
        self.steps
    }
}
