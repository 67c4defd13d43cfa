//! A synchronous ttrpc client that sleeps while it waits.
//!
//! Why not `ttrpc::Client` (0.10, the latest): its receiver thread polls
//! the socket with a 10 ms timeout, only so that it notices when the client
//! is dropped, which wakes every idle monitor, shim and pool keeper 100
//! times a second; and every request passes through a sender thread and a
//! channel before it is written. Here the caller writes its own request,
//! one reader thread sleeps in read(2) until a frame arrives, and dropping
//! the last handle shuts the socket down, which wakes that reader to leave.
//! The frames and messages are ttrpc's own (`ttrpc::proto`); the server
//! side (the agent) is unchanged.
//!
//! Everything read here comes from the guest: a frame's length is checked
//! against ttrpc's own limit before anything is allocated for it, a reply
//! for no waiting call is dropped, and a frame that cannot be read ends the
//! connection for every call on it.

use protobuf::Message;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use ttrpc::proto::{
    MessageHeader, MESSAGE_HEADER_LENGTH, MESSAGE_LENGTH_MAX, MESSAGE_TYPE_RESPONSE,
};

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The peer answered with a non-OK status. Its message is the peer's:
    /// shown bounded and printable.
    #[error("status {:?}: {}", .0.code(), crate::agent::printable(.0.message(), crate::agent::MAX_AGENT_MESSAGE))]
    Status(ttrpc::Status),
    /// The connection is broken (closed, reset, a frame that could not be
    /// read or written); every call on it fails so, with the first cause
    /// (a text: every waiting call gets its copy).
    #[error("{0}")]
    Disconnected(String),
    /// No answer within the call's timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// A request or reply that is not a message of its type.
    #[error("{0}")]
    Malformed(String),
}

/// The longest a call with no timeout of its own may take to write its
/// request: a peer that stops reading must not hold a caller (or, through
/// the write lock, every caller) for good.
const WRITE_LIMIT: Duration = Duration::from_secs(30);

type Reply = Result<Vec<u8>, String>;

/// The calls waiting for their replies, by stream id.
#[derive(Default)]
struct Calls {
    /// The next stream id: a client's are odd, 1, 3, 5, ... (wrapping from
    /// u32::MAX back to 1).
    next_id: u32,
    waiting: HashMap<u32, SyncSender<Reply>>,
    /// Why the connection ended, once it has (the first cause is kept).
    broken: Option<String>,
}

impl Calls {
    /// Records the end of the connection and fails every waiting call.
    fn break_all(&mut self, why: String) {
        let why = self.broken.get_or_insert(why).clone();
        for (_, tx) in self.waiting.drain() {
            let _ = tx.send(Err(why.clone()));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The writing end of a connection; the reader thread holds its own
/// descriptor of the same socket and the shared call table. Locks are taken
/// in this order: `socket`, then `calls`; the reader takes only `calls`.
struct Connection {
    socket: Mutex<UnixStream>,
    calls: Arc<Mutex<Calls>>,
    service: &'static str,
}

impl Drop for Connection {
    /// Wakes the reader, which then fails whatever still waits and leaves.
    fn drop(&mut self) {
        let _ = lock(&self.socket).shutdown(std::net::Shutdown::Both);
    }
}

/// A client of one ttrpc service on one connection; clones share it.
#[derive(Clone)]
pub struct RpcClient {
    connection: Arc<Connection>,
}

impl RpcClient {
    /// A client of `service` (its full name, e.g. `husk.agent.v1.Agent`)
    /// over a connected stream.
    pub fn new(stream: UnixStream, service: &'static str) -> std::io::Result<RpcClient> {
        // The reader sleeps in read(2) until a frame comes, whatever the
        // stream was set to before.
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(None)?;
        let reader = stream.try_clone()?;
        let calls = Arc::new(Mutex::new(Calls {
            next_id: 1,
            ..Default::default()
        }));
        let table = Arc::clone(&calls);
        std::thread::Builder::new()
            .name("ttrpc-reader".into())
            .spawn(move || read_replies(reader, &table))?;
        Ok(RpcClient {
            connection: Arc::new(Connection {
                socket: Mutex::new(stream),
                calls,
                service,
            }),
        })
    }

    /// Calls `method` with `request` and waits for its reply, at most
    /// `timeout` (None: as long as it takes, for calls that block by
    /// design; writing the request is limited either way). A timeout is
    /// also sent to the server, as ttrpc does.
    pub fn call<Req: Message, Res: Message>(
        &self,
        method: &str,
        request: &Req,
        timeout: Option<Duration>,
    ) -> Result<Res, RpcError> {
        let started = Instant::now();
        let malformed = |what: &str, e: protobuf::Error| {
            RpcError::Malformed(format!("{what} is malformed: {e}"))
        };
        let mut envelope = ttrpc::Request::new();
        envelope.service = self.connection.service.to_string();
        envelope.method = method.to_string();
        envelope.timeout_nano = timeout.map_or(0, |t| t.as_nanos().min(i64::MAX as u128) as i64);
        envelope.payload = request
            .write_to_bytes()
            .map_err(|e| malformed("the request", e))?;
        let body = envelope
            .write_to_bytes()
            .map_err(|e| malformed("the request", e))?;
        if body.len() > MESSAGE_LENGTH_MAX {
            return Err(RpcError::Malformed(format!(
                "a request of {} bytes (ttrpc carries at most {MESSAGE_LENGTH_MAX})",
                body.len()
            )));
        }
        let (tx, rx) = sync_channel(1);
        let id = {
            // The id is taken under the write lock, so ids reach the wire
            // in increasing order (containerd's ttrpc requires it).
            let mut socket = lock(&self.connection.socket);
            let id = {
                let mut calls = lock(&self.connection.calls);
                if let Some(why) = &calls.broken {
                    return Err(RpcError::Disconnected(why.clone()));
                }
                // After 2^31 calls the ids wrap: one still waiting (a long
                // WaitProcess) keeps its own.
                let mut id = calls.next_id;
                while calls.waiting.contains_key(&id) {
                    id = id.wrapping_add(2);
                }
                calls.next_id = id.wrapping_add(2);
                calls.waiting.insert(id, tx);
                id
            };
            let mut frame: Vec<u8> = MessageHeader::new_request(id, body.len() as u32).into();
            frame.extend_from_slice(&body);
            // A peer that stops reading (a guest granting no vsock credit)
            // fills the socket: the write gives up at the call's deadline.
            let limit = timeout.unwrap_or(WRITE_LIMIT);
            let left = limit
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(1));
            let written = socket
                .set_write_timeout(Some(left))
                .and_then(|()| socket.write_all(&frame));
            if let Err(e) = written {
                // A frame cut short leaves the stream unreadable for the
                // peer: the connection is over for every call.
                let why = match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        format!("sending {method}: the peer took nothing for {limit:?}")
                    }
                    _ => format!("sending {method}: {e}"),
                };
                lock(&self.connection.calls).break_all(why);
                let _ = socket.shutdown(std::net::Shutdown::Both);
                // This call's own sender was failed with the cause above.
            }
            id
        };
        let reply = match timeout {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(t) => rx.recv_timeout(t.saturating_sub(started.elapsed())),
        };
        let body = match reply {
            Ok(Ok(body)) => body,
            Ok(Err(why)) => return Err(RpcError::Disconnected(why)),
            Err(RecvTimeoutError::Timeout) => {
                // A reply that still comes finds no one and is dropped.
                lock(&self.connection.calls).waiting.remove(&id);
                return Err(RpcError::Timeout(timeout.unwrap_or_default()));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(RpcError::Disconnected("the reader ended".into()))
            }
        };
        let response =
            ttrpc::Response::parse_from_bytes(&body).map_err(|e| malformed("the reply", e))?;
        if let Some(status) = response.status.as_ref() {
            if status.code() != ttrpc::Code::OK {
                return Err(RpcError::Status(status.clone()));
            }
        }
        Res::parse_from_bytes(&response.payload).map_err(|e| malformed("the reply's payload", e))
    }

    /// How many calls wait for their replies now.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        lock(&self.connection.calls).waiting.len()
    }
}

/// The reader thread: hands each reply to the call waiting for it until
/// the connection ends, then fails every call still waiting.
fn read_replies(mut socket: UnixStream, calls: &Mutex<Calls>) {
    let why = loop {
        let mut header = [0u8; MESSAGE_HEADER_LENGTH];
        if let Err(e) = socket.read_exact(&mut header) {
            break match e.kind() {
                std::io::ErrorKind::UnexpectedEof => "the connection was closed".to_string(),
                _ => format!("reading a reply: {e}"),
            };
        }
        let header = MessageHeader::from(&header);
        let length = header.length as usize;
        if length > MESSAGE_LENGTH_MAX {
            break format!(
                "a reply of {length} bytes (ttrpc carries at most {MESSAGE_LENGTH_MAX})"
            );
        }
        let mut body = vec![0u8; length];
        if let Err(e) = socket.read_exact(&mut body) {
            break format!("reading a reply: {e}");
        }
        // The agent's API has no streaming calls: anything but a response
        // is a peer that does not speak the protocol.
        if header.type_ != MESSAGE_TYPE_RESPONSE {
            break format!(
                "a malformed frame (type {:#04x}, not a response)",
                header.type_
            );
        }
        let waiting = lock(calls).waiting.remove(&header.stream_id);
        if let Some(tx) = waiting {
            let _ = tx.send(Ok(body));
        }
    };
    let _ = socket.shutdown(std::net::Shutdown::Both);
    lock(calls).break_all(why);
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_protocol::agent::{HealthRequest, HealthResponse};

    /// A limit for calls a test expects answered: a regression fails the
    /// test instead of hanging it.
    const TEN: Duration = Duration::from_secs(10);

    /// Reads one request frame from the client's peer end.
    fn read_request(peer: &mut UnixStream) -> (u32, ttrpc::Request) {
        let mut header = [0u8; MESSAGE_HEADER_LENGTH];
        peer.read_exact(&mut header).unwrap();
        let header = MessageHeader::from(&header);
        let mut body = vec![0u8; header.length as usize];
        peer.read_exact(&mut body).unwrap();
        (
            header.stream_id,
            ttrpc::Request::parse_from_bytes(&body).unwrap(),
        )
    }

    fn reply(peer: &mut UnixStream, id: u32, payload: &impl Message) {
        let mut response = ttrpc::Response::new();
        response.payload = payload.write_to_bytes().unwrap();
        let body = response.write_to_bytes().unwrap();
        let mut frame: Vec<u8> = MessageHeader::new_response(id, body.len() as u32).into();
        frame.extend_from_slice(&body);
        peer.write_all(&frame).unwrap();
    }

    /// A client on one end of a socket pair; the test speaks for the
    /// server on the other.
    fn connected() -> (RpcClient, UnixStream) {
        let (ours, peer) = UnixStream::pair().unwrap();
        (RpcClient::new(ours, "husk.agent.v1.Agent").unwrap(), peer)
    }

    /// A Health call on a thread of its own, limited to [`TEN`].
    fn health_call(
        client: &RpcClient,
    ) -> std::thread::JoinHandle<Result<HealthResponse, RpcError>> {
        let c = client.clone();
        std::thread::spawn(move || c.call("Health", &HealthRequest::default(), Some(TEN)))
    }

    fn health(version: &str) -> HealthResponse {
        HealthResponse {
            version: version.into(),
            ..Default::default()
        }
    }

    /// The kernel's count of times each thread of ours named `name` slept,
    /// by thread id.
    fn sleeps_of(name: &str) -> HashMap<String, u64> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name)
            })
            .filter_map(|t| {
                let status = std::fs::read_to_string(t.path().join("status")).ok()?;
                let count = status
                    .lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|v| v.trim().parse().ok())?;
                Some((t.file_name().to_string_lossy().into_owned(), count))
            })
            .collect()
    }

    #[test]
    fn replies_reach_their_calls_in_any_order_and_late_ones_are_dropped() {
        let (client, mut peer) = connected();
        let (a, b) = (client.clone(), client.clone());
        let first = std::thread::spawn(move || {
            a.call::<_, HealthResponse>("Health", &HealthRequest::default(), None)
        });
        let (id1, req1) = read_request(&mut peer);
        assert_eq!(
            (req1.service.as_str(), req1.method.as_str()),
            ("husk.agent.v1.Agent", "Health")
        );
        assert_eq!(req1.timeout_nano, 0);
        let second = std::thread::spawn(move || {
            b.call::<_, HealthResponse>(
                "Health",
                &HealthRequest::default(),
                Some(Duration::from_secs(30)),
            )
        });
        let (id2, req2) = read_request(&mut peer);
        assert_eq!(req2.timeout_nano, 30_000_000_000);
        assert_ne!(id1, id2);
        // The second is answered first; the first keeps waiting.
        reply(&mut peer, id2, &health("two"));
        assert_eq!(second.join().unwrap().unwrap().version, "two");
        reply(&mut peer, id1, &health("one"));
        assert_eq!(first.join().unwrap().unwrap().version, "one");
        // A call that times out leaves no entry behind; its late reply,
        // arriving while the next call waits, is dropped, not handed over.
        let e = client
            .call::<_, HealthResponse>(
                "Health",
                &HealthRequest::default(),
                Some(Duration::from_millis(50)),
            )
            .unwrap_err();
        assert!(matches!(e, RpcError::Timeout(_)), "{e}");
        assert_eq!(client.waiting(), 0);
        let (late, _) = read_request(&mut peer);
        let next = health_call(&client);
        let (id, _) = read_request(&mut peer);
        assert_ne!(id, late);
        reply(&mut peer, late, &health("late"));
        reply(&mut peer, id, &health("next"));
        assert_eq!(next.join().unwrap().unwrap().version, "next");
        assert_eq!(client.waiting(), 0);
    }

    #[test]
    fn an_oversized_or_cut_reply_ends_every_call_with_a_clear_error() {
        let (client, mut peer) = connected();
        // Two calls wait; a guest announces 5 MiB in answer to the first:
        // refused before anything is allocated, and both calls end so.
        let (first, second) = (health_call(&client), health_call(&client));
        let (id, _) = read_request(&mut peer);
        let _ = read_request(&mut peer);
        let header: Vec<u8> = MessageHeader::new_response(id, 5 << 20).into();
        peer.write_all(&header).unwrap();
        for waiting in [first, second] {
            let e = waiting.join().unwrap().unwrap_err();
            assert!(
                matches!(&e, RpcError::Disconnected(m) if m.contains("5242880 bytes")),
                "{e}"
            );
        }
        // Later calls fail at once, naming the same cause.
        let e = client
            .call::<_, HealthResponse>("Health", &HealthRequest::default(), Some(TEN))
            .unwrap_err();
        assert!(
            matches!(&e, RpcError::Disconnected(m) if m.contains("5242880")),
            "{e}"
        );

        // A frame that is no response (ttrpc's data frames, or any other
        // type): the peer does not speak the protocol.
        let (client, mut peer) = connected();
        let waiting = health_call(&client);
        let (id, _) = read_request(&mut peer);
        let mut header = MessageHeader::new_response(id, 0);
        header.type_ = 0x7f;
        peer.write_all(&Vec::<u8>::from(header)).unwrap();
        let e = waiting.join().unwrap().unwrap_err();
        assert!(
            matches!(&e, RpcError::Disconnected(m) if m.contains("type 0x7f")),
            "{e}"
        );
        // A reply that is not a ttrpc response fails its call only.
        let (client, mut peer) = connected();
        let waiting = health_call(&client);
        let (id, _) = read_request(&mut peer);
        let garbage = [0x7a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01];
        let mut frame: Vec<u8> = MessageHeader::new_response(id, garbage.len() as u32).into();
        frame.extend_from_slice(&garbage);
        peer.write_all(&frame).unwrap();
        let e = waiting.join().unwrap().unwrap_err();
        assert!(
            matches!(&e, RpcError::Malformed(m) if m.starts_with("the reply is malformed")),
            "{e}"
        );
        let next = health_call(&client);
        let (id, _) = read_request(&mut peer);
        reply(&mut peer, id, &health("after"));
        assert_eq!(next.join().unwrap().unwrap().version, "after");

        // A peer that closes mid-frame.
        let (client, mut peer) = connected();
        let waiting = health_call(&client);
        let (id, _) = read_request(&mut peer);
        let header: Vec<u8> = MessageHeader::new_response(id, 100).into();
        peer.write_all(&header).unwrap();
        peer.write_all(b"short").unwrap();
        drop(peer);
        let e = waiting.join().unwrap().unwrap_err();
        assert!(
            matches!(&e, RpcError::Disconnected(m) if m.contains("reading a reply")),
            "{e}"
        );
    }

    #[test]
    fn a_peer_that_reads_nothing_cannot_hold_a_call_past_its_timeout() {
        use husk_protocol::agent::UpdateResourcesRequest;
        let (client, _peer) = connected();
        // 3 MiB: more than the socket buffers take from a peer reading none.
        let big = UpdateResourcesRequest {
            resources_json: vec![b'x'; 3 << 20],
            ..Default::default()
        };
        let c = client.clone();
        let t = Instant::now();
        let blocked = std::thread::spawn(move || {
            c.call::<_, HealthResponse>("UpdateResources", &big, Some(Duration::from_millis(300)))
        });
        // Another caller meanwhile waits for the write lock, then finds the
        // connection over.
        std::thread::sleep(Duration::from_millis(50));
        let other =
            client.call::<_, HealthResponse>("Health", &HealthRequest::default(), Some(TEN));
        let e = blocked.join().unwrap().unwrap_err();
        assert!(
            matches!(&e, RpcError::Disconnected(m) if m.contains("took nothing")),
            "{e}"
        );
        assert!(
            matches!(&other, Err(RpcError::Disconnected(_))),
            "{other:?}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        assert_eq!(client.waiting(), 0);
    }

    #[test]
    fn an_idle_client_sleeps_and_a_dropped_one_leaves_no_thread() {
        let (ours, _peer) = UnixStream::pair().unwrap();
        let before = sleeps_of("ttrpc-reader");
        let client = RpcClient::new(ours, "husk.agent.v1.Agent").unwrap();
        // Ours is among the readers that were not there before (another
        // test may make one meanwhile: the quietest is taken as ours). A
        // thread names itself once it runs: looked for until it has.
        let new = |now: &HashMap<String, u64>| -> Vec<(String, u64)> {
            now.iter()
                .filter(|(tid, _)| !before.contains_key(*tid))
                .map(|(t, n)| (t.clone(), *n))
                .collect()
        };
        let deadline = Instant::now() + TEN;
        let mut start = new(&sleeps_of("ttrpc-reader"));
        while start.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            start = new(&sleeps_of("ttrpc-reader"));
        }
        assert!(!start.is_empty(), "no reader thread");
        std::thread::sleep(Duration::from_millis(500));
        let end = sleeps_of("ttrpc-reader");
        let (ours, quietest) = start
            .iter()
            .filter_map(|(tid, n)| Some((tid.clone(), end.get(tid)? - n)))
            .min_by_key(|(_, woke)| *woke)
            .unwrap();
        // ttrpc's own client wakes 50 times in this half second.
        assert!(quietest <= 2, "the idle reader woke {quietest} times");
        drop(client);
        while sleeps_of("ttrpc-reader").contains_key(&ours) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            !sleeps_of("ttrpc-reader").contains_key(&ours),
            "the reader outlived its client"
        );
    }
}
