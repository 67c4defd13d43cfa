//! A container's life as the runtime spec names it, and the only moves
//! between its states: the CLI's monitor and the shim both change a
//! container's status through [`Status::next`], so neither can, say, start
//! a stopped container or pause one that never ran.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The VM is booting or the container is being made in it.
    Creating,
    /// The container exists in the guest; its process waits for `start`.
    Created,
    Running,
    Paused,
    Stopped,
}

/// What happens to a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The guest made the container.
    Made,
    /// `start`: its process runs.
    Start,
    Pause,
    Resume,
    /// Its process ended (or was killed before it started, or the VM died).
    Exit,
    /// `delete` (with `--force` for a running or paused one).
    Delete {
        force: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {} a container that is {}", .event.verb(), .from.as_str())]
pub struct IllegalTransition {
    pub from: Status,
    pub event: Event,
}

impl Event {
    fn verb(self) -> &'static str {
        match self {
            Event::Made => "finish creating",
            Event::Start => "start",
            Event::Pause => "pause",
            Event::Resume => "resume",
            Event::Exit => "record the exit of",
            Event::Delete { force: false } => "delete",
            Event::Delete { force: true } => "force-delete",
        }
    }
}

/// Where a move leads: a status, or gone (deleted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Is(Status),
    Deleted,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }

    /// The status after `event`, or why `event` cannot happen now.
    pub fn next(self, event: Event) -> Result<Next, IllegalTransition> {
        use Status::*;
        let next = match (self, event) {
            (Creating, Event::Made) => Next::Is(Created),
            (Created, Event::Start) => Next::Is(Running),
            (Running, Event::Pause) => Next::Is(Paused),
            (Paused, Event::Resume) => Next::Is(Running),
            // A container killed before it started, a process that ended,
            // a VM that died (a creating one too: its boot failed).
            (Creating | Created | Running | Paused, Event::Exit) => Next::Is(Stopped),
            // runc deletes a created container (its process never ran)
            // and a stopped one; a running or paused one only with force.
            (Created | Stopped, Event::Delete { .. }) => Next::Deleted,
            (Running | Paused, Event::Delete { force: true }) => Next::Deleted,
            (from, event) => return Err(IllegalTransition { from, event }),
        };
        Ok(next)
    }

    /// Whether the container's process may still be running.
    pub fn is_live(self) -> bool {
        matches!(self, Status::Created | Status::Running | Status::Paused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Status; 5] = [
        Status::Creating,
        Status::Created,
        Status::Running,
        Status::Paused,
        Status::Stopped,
    ];
    const EVENTS: [Event; 7] = [
        Event::Made,
        Event::Start,
        Event::Pause,
        Event::Resume,
        Event::Exit,
        Event::Delete { force: false },
        Event::Delete { force: true },
    ];

    /// Every (status, event) pair, legal or not, against the table the
    /// runtime spec's lifecycle gives.
    #[test]
    fn every_transition_legal_and_illegal() {
        use Next::*;
        use Status::*;
        let expected = |from: Status, event: Event| -> Option<Next> {
            Some(match (from, event) {
                (Creating, Event::Made) => Is(Created),
                (Creating, Event::Exit) => Is(Stopped),
                (Created, Event::Start) => Is(Running),
                (Created, Event::Exit) => Is(Stopped),
                (Created, Event::Delete { .. }) => Deleted,
                (Running, Event::Pause) => Is(Paused),
                (Running, Event::Exit) => Is(Stopped),
                (Running, Event::Delete { force: true }) => Deleted,
                (Paused, Event::Resume) => Is(Running),
                (Paused, Event::Exit) => Is(Stopped),
                (Paused, Event::Delete { force: true }) => Deleted,
                (Stopped, Event::Delete { .. }) => Deleted,
                _ => return None,
            })
        };
        let mut legal = 0;
        for from in ALL {
            for event in EVENTS {
                match (from.next(event), expected(from, event)) {
                    (Ok(got), Some(want)) => {
                        assert_eq!(got, want, "{from:?} + {event:?}");
                        legal += 1;
                    }
                    (Err(e), None) => {
                        assert_eq!(e, IllegalTransition { from, event });
                        assert!(e.to_string().contains(from.as_str()), "{e}");
                    }
                    (got, want) => panic!("{from:?} + {event:?}: got {got:?}, want {want:?}"),
                }
            }
        }
        assert_eq!(legal, 14);
    }

    #[test]
    fn errors_read_as_runc_words_them() {
        let e = Status::Stopped.next(Event::Start).expect_err("legal");
        assert_eq!(e.to_string(), "cannot start a container that is stopped");
        let e = Status::Running
            .next(Event::Delete { force: false })
            .expect_err("legal");
        assert_eq!(e.to_string(), "cannot delete a container that is running");
        let e = Status::Created.next(Event::Pause).expect_err("legal");
        assert_eq!(e.to_string(), "cannot pause a container that is created");
    }

    #[test]
    fn statuses_serialise_as_the_spec_names_them() {
        for s in ALL {
            assert_eq!(
                serde_json::to_value(s).ok(),
                Some(serde_json::Value::String(s.as_str().into()))
            );
        }
        assert!(!Status::Stopped.is_live() && !Status::Creating.is_live());
        assert!(Status::Paused.is_live());
    }
}
