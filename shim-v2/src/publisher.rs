//! Events to containerd (TaskExit and the rest) over its `TTRPC_ADDRESS`.
//!
//! containerd can restart while its shims run on: it finds them again from
//! its state directory, but the connection a shim opened to containerd's
//! event socket is dead from then on. A publisher that keeps one connection
//! for life (containerd-shim's `RemotePublisher`) loses every later event,
//! TaskExit included, so CRI never learns that a container stopped. This
//! one queues the events, sends them in order from a thread of its own
//! (callers never wait on containerd), and when a send fails it reconnects
//! and tries the same event again with a growing pause, for as long as a
//! containerd restart plausibly takes, before it drops the event.

use containerd_shim::protos::api::Empty;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::shim::event::Envelope;
use containerd_shim::protos::shim::events::ForwardRequest;
use husk_runtime::rpc::{RpcClient, RpcError};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why an event did not reach containerd.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// containerd's event socket could not be connected to.
    #[error("connecting to containerd's event socket {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    /// The connection broke or containerd did not answer in time.
    #[error("forwarding {topic} to containerd: {source}")]
    Forward { topic: String, source: RpcError },
    /// containerd answered, and refused the event: sending it again would
    /// be refused again.
    #[error("containerd refused {topic}: {source}")]
    Refused { topic: String, source: RpcError },
    /// The event could not be packed into an envelope.
    #[error("encoding {topic}: {source}")]
    Encode {
        topic: String,
        source: containerd_shim::Error,
    },
    /// The sending thread could not be started.
    #[error("starting the event publisher thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// How hard one event is tried.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    /// Limit of one Forward call.
    pub rpc_timeout: Duration,
    /// The first pause after a failure; it doubles up to `max_pause`.
    pub first_pause: Duration,
    pub max_pause: Duration,
    /// An event still not sent this long after its first try is dropped.
    pub give_up_after: Duration,
}

impl Default for Retry {
    fn default() -> Retry {
        // A containerd restart takes a few seconds; under load (or with a
        // supervisor's restart delay) it can take tens of seconds, and a
        // TaskExit lost is a container CRI believes runs forever.
        Retry {
            rpc_timeout: Duration::from_secs(5),
            first_pause: Duration::from_millis(100),
            max_pause: Duration::from_secs(2),
            give_up_after: Duration::from_secs(60),
        }
    }
}

struct Queued {
    topic: String,
    request: ForwardRequest,
}

/// Sends events to containerd in the order they were published.
pub struct Publisher {
    queue: Mutex<Option<Sender<Queued>>>,
    /// Receives once when the sending thread has finished.
    done: Mutex<Receiver<()>>,
}

impl Publisher {
    /// Starts the sending thread; it connects on the first event.
    pub fn new(address: &str, retry: Retry) -> Result<Publisher, PublishError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let address = address.to_string();
        std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || {
                send_all(&address, rx, retry);
                let _ = done_tx.send(());
            })
            .map_err(PublishError::Spawn)?;
        Ok(Publisher {
            queue: Mutex::new(Some(tx)),
            done: Mutex::new(done_rx),
        })
    }

    /// Queues `event` on `topic` for namespace `namespace`, stamped now.
    pub fn publish(
        &self,
        topic: &str,
        namespace: &str,
        event: Box<dyn MessageDyn>,
    ) -> Result<(), PublishError> {
        let encode = |source| PublishError::Encode {
            topic: topic.to_string(),
            source,
        };
        let mut envelope = Envelope::new();
        envelope.set_topic(topic.to_string());
        envelope.set_namespace(namespace.to_string());
        envelope.set_timestamp(containerd_shim::util::timestamp().map_err(encode)?);
        envelope.set_event(containerd_shim::util::convert_to_any(event).map_err(encode)?);
        let mut request = ForwardRequest::new();
        request.set_envelope(envelope);
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(q) = queue.as_ref() {
            // The thread only ends after the queue is closed.
            let _ = q.send(Queued {
                topic: topic.to_string(),
                request,
            });
        }
        Ok(())
    }

    /// Closes the queue and waits up to `within` for the events already in
    /// it to be sent (the shim is about to exit: TaskDelete must get out).
    /// Returns false if some may not have been sent.
    pub fn close(&self, within: Duration) -> bool {
        drop(self.queue.lock().unwrap_or_else(|p| p.into_inner()).take());
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        done.recv_timeout(within).is_ok()
    }
}

/// containerd's event service (its ttrpc name).
const EVENTS_SERVICE: &str = "containerd.services.events.ttrpc.v1.Events";

fn send_all(address: &str, queue: Receiver<Queued>, retry: Retry) {
    // husk's ttrpc client, not containerd-shim's: that one (ttrpc 0.10's)
    // polls every 10 ms for the shim's whole life (see `husk_runtime::rpc`).
    let mut client: Option<RpcClient> = None;
    for event in queue {
        let first_try = Instant::now();
        let mut pause = retry.first_pause;
        let mut failures = 0u32;
        loop {
            match send_one(address, &mut client, &event, retry.rpc_timeout) {
                Ok(()) => {
                    if failures > 0 {
                        log::info!(
                            "{} reached containerd after {failures} failed tries",
                            event.topic
                        );
                    }
                    break;
                }
                Err(e @ PublishError::Refused { .. }) => {
                    log::warn!("{e}");
                    break;
                }
                Err(e) => {
                    // The connection is of no more use: a new one next time.
                    client = None;
                    failures += 1;
                    if first_try.elapsed() + pause > retry.give_up_after {
                        log::error!(
                            "dropping {}: not sent within {:?} ({failures} tries): {e}",
                            event.topic,
                            retry.give_up_after
                        );
                        break;
                    }
                    if failures == 1 {
                        log::warn!("{e}; reconnecting and trying again");
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(retry.max_pause);
                }
            }
        }
    }
}

fn send_one(
    address: &str,
    client: &mut Option<RpcClient>,
    event: &Queued,
    timeout: Duration,
) -> Result<(), PublishError> {
    let events = match client {
        Some(c) => c,
        None => {
            let connect = |source| PublishError::Connect {
                address: address.to_string(),
                source,
            };
            // TTRPC_ADDRESS is a socket path, as containerd-shim takes it.
            let path = address.strip_prefix("unix://").unwrap_or(address);
            let stream = UnixStream::connect(path).map_err(connect)?;
            client.insert(RpcClient::new(stream, EVENTS_SERVICE).map_err(connect)?)
        }
    };
    match events.call::<_, Empty>("Forward", &event.request, Some(timeout)) {
        Ok(_) => Ok(()),
        Err(source @ RpcError::Status(_)) => Err(PublishError::Refused {
            topic: event.topic.clone(),
            source,
        }),
        Err(source) => Err(PublishError::Forward {
            topic: event.topic.clone(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::api::Empty;
    use containerd_shim::protos::events::task::TaskExit;
    use containerd_shim::protos::{create_events, Events};
    use std::os::fd::IntoRawFd;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    /// containerd's event service: records the topics it receives.
    struct Recorder {
        topics: Arc<Mutex<Vec<String>>>,
    }

    impl Events for Recorder {
        fn forward(&self, _ctx: &ttrpc::TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
            let topic = req.envelope().topic().to_string();
            if topic == "/refuse" {
                return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::INVALID_ARGUMENT,
                    "refused",
                )));
            }
            self.topics
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(topic);
            Ok(Empty::new())
        }
    }

    fn serve(path: &Path, topics: Arc<Mutex<Vec<String>>>) -> ttrpc::Server {
        let _ = std::fs::remove_file(path);
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        let service = create_events(Arc::new(Recorder { topics }));
        let mut server = ttrpc::Server::new()
            .add_listener(listener.into_raw_fd())
            .unwrap()
            .register_service(service);
        server.start().unwrap();
        server
    }

    fn socket(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("husk-pub-{name}-{}.sock", std::process::id()))
    }

    fn quick() -> Retry {
        Retry {
            rpc_timeout: Duration::from_secs(2),
            first_pause: Duration::from_millis(20),
            max_pause: Duration::from_millis(100),
            give_up_after: Duration::from_secs(10),
        }
    }

    fn exit_event(id: &str) -> Box<TaskExit> {
        Box::new(TaskExit {
            container_id: id.into(),
            exit_status: 42,
            ..Default::default()
        })
    }

    fn wait_for(topics: &Mutex<Vec<String>>, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let t = topics.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if t.len() >= n || Instant::now() > deadline {
                return t;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn events_reach_a_restarted_server_in_order() {
        let path = socket("restart");
        let address = path.to_str().unwrap();
        let topics = Arc::new(Mutex::new(Vec::new()));
        let server = serve(&path, topics.clone());
        let p = Publisher::new(address, quick()).unwrap();
        p.publish("/tasks/start", "ns", exit_event("a")).unwrap();
        assert_eq!(wait_for(&topics, 1), ["/tasks/start"]);

        // containerd goes away; events published meanwhile wait for it.
        server.shutdown();
        let _ = std::fs::remove_file(&path);
        p.publish("/tasks/exit", "ns", exit_event("a")).unwrap();
        p.publish("/tasks/delete", "ns", exit_event("a")).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let server = serve(&path, topics.clone());
        assert_eq!(
            wait_for(&topics, 3),
            ["/tasks/start", "/tasks/exit", "/tasks/delete"]
        );
        assert!(p.close(Duration::from_secs(5)));
        server.shutdown();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_refused_event_is_not_retried_and_blocks_nothing() {
        let path = socket("refuse");
        let topics = Arc::new(Mutex::new(Vec::new()));
        let server = serve(&path, topics.clone());
        let p = Publisher::new(path.to_str().unwrap(), quick()).unwrap();
        p.publish("/refuse", "ns", exit_event("b")).unwrap();
        p.publish("/tasks/exit", "ns", exit_event("b")).unwrap();
        assert_eq!(wait_for(&topics, 1), ["/tasks/exit"]);
        assert!(p.close(Duration::from_secs(5)));
        server.shutdown();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn an_unreachable_containerd_gives_up_after_the_limit() {
        let path = socket("none");
        let retry = Retry {
            give_up_after: Duration::from_millis(200),
            ..quick()
        };
        let p = Publisher::new(path.to_str().unwrap(), retry).unwrap();
        p.publish("/tasks/exit", "ns", exit_event("c")).unwrap();
        let t0 = Instant::now();
        assert!(p.close(Duration::from_secs(5)), "close waits, bounded");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        // After close, publishing is a no-op, not an error.
        p.publish("/tasks/exit", "ns", exit_event("c")).unwrap();
    }
}
