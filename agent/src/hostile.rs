//! Test-only attacks: what an attacker holding the guest's kernel and agent
//! answers to the host, for tests/tests/hostile.rs.
//!
//! Compiled only with the `hostile-test` cargo feature, which `make` builds
//! into a target directory of its own and packs into
//! target/guest/initramfs-hostile.img alone: the production agent has no
//! such mode (a test checks that its initramfs lacks [`PARAM`]).
//!
//! The agent behaves normally unless the guest kernel's command line says
//! `husk.hostile=<attack>` (a test sets it through the runtime's
//! `kernel_params`); the attack then replaces the answer to one RPC.

use husk_protocol::agent::WaitProcessResponse;
use std::sync::OnceLock;
use ttrpc::proto::{Codec, MessageHeader, Response, MESSAGE_LENGTH_MAX};
use ttrpc::{Code, TtrpcContext};

/// The kernel parameter that names the attack.
pub const PARAM: &str = "husk.hostile=";

/// What a terminal must never receive from a guest: an OSC title change, a
/// BEL, a clear-screen, a carriage return, a C1 CSI and a newline that
/// would start a forged log line.
const ESCAPES: &str = "\u{1b}]0;pwned\u{7}\u{1b}[2J\r\u{9b}31m\nhusk: forged ";

#[derive(Debug, thiserror::Error)]
pub enum HostileError {
    #[error("reading /proc/cmdline: {0}")]
    Cmdline(std::io::Error),
    #[error("unknown hostile attack {0:?}")]
    Unknown(String),
}

/// One attack: the RPC it answers and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    /// StartContainer: a frame on the request's stream of a message type
    /// that is no response.
    StartBadType,
    /// StartContainer: a well-formed response on a stream the host never
    /// opened, and nothing on its own.
    StartWrongStream,
    /// StartContainer: a response whose payload is not protobuf.
    StartGarbage,
    /// StartContainer: a response of exactly the largest frame ttrpc takes
    /// (4 MiB), an error whose message is escape sequences end to end.
    StartHuge,
    /// StartContainer: a header claiming 4 GiB, then silence.
    StartOversized,
    /// StartContainer: never answered.
    StartHang,
    /// WaitProcess: the process "ended by" this signal number.
    WaitSignal(u32),
    /// ExecProcess: an error whose message carries escape sequences.
    ExecEscapes,
    /// stdin: the first acknowledgement claims every byte there is
    /// (u64::MAX), more than the host ever sent.
    StdinAckBeyond,
    /// stdin: bytes are taken and never acknowledged.
    StdinAckNever,
}

impl std::str::FromStr for Attack {
    type Err = HostileError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "start-bad-type" => Attack::StartBadType,
            "start-wrong-stream" => Attack::StartWrongStream,
            "start-garbage" => Attack::StartGarbage,
            "start-huge" => Attack::StartHuge,
            "start-oversized" => Attack::StartOversized,
            "start-hang" => Attack::StartHang,
            "exec-escapes" => Attack::ExecEscapes,
            "stdin-ack-beyond" => Attack::StdinAckBeyond,
            "stdin-ack-never" => Attack::StdinAckNever,
            other => match other.strip_prefix("wait-signal-").map(str::parse) {
                Some(Ok(n)) => Attack::WaitSignal(n),
                _ => return Err(HostileError::Unknown(other.to_string())),
            },
        })
    }
}

static ATTACK: OnceLock<Option<Attack>> = OnceLock::new();

/// Reads the attack from the kernel command line (once /proc is mounted).
/// An unknown name is fatal: a test asking for it must not pass by
/// meeting a well-behaved agent.
pub fn load() -> Result<(), HostileError> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(HostileError::Cmdline)?;
    let attack = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(PARAM))
        .map(str::parse)
        .transpose()?;
    if let Some(a) = attack {
        eprintln!("husk-agent: hostile test mode: {a:?}");
    }
    let _ = ATTACK.set(attack);
    Ok(())
}

fn attack() -> Option<Attack> {
    ATTACK.get().copied().flatten()
}

/// Queues a frame on the connection's writer, which sends header and
/// payload as given: nothing there checks that they agree.
fn send_frame(ctx: &TtrpcContext, header: MessageHeader, payload: Vec<u8>) {
    let _ = ctx.res_tx.send((header, payload));
}

fn response_header(stream_id: u32, payload: &[u8]) -> MessageHeader {
    MessageHeader::new_response(stream_id, payload.len() as u32)
}

/// An error response whose encoding is exactly `MESSAGE_LENGTH_MAX` bytes.
fn huge_error_response() -> Vec<u8> {
    // A message of exactly `len` bytes: the escapes over and over, spaces
    // where the next character would not fit.
    let encode = |len: usize| -> Vec<u8> {
        let mut message = String::with_capacity(len);
        for c in ESCAPES.chars().cycle() {
            if message.len() + c.len_utf8() > len {
                break;
            }
            message.push(c);
        }
        let pad = len - message.len();
        message.push_str(&" ".repeat(pad));
        let status = ttrpc::get_status(Code::INTERNAL, message);
        Response::from(ttrpc::Error::RpcStatus(status))
            .encode()
            .unwrap_or_default()
    };
    // Protobuf adds a few bytes of tags and lengths, the same number for
    // any message near the target.
    let probe = MESSAGE_LENGTH_MAX - 64;
    let overhead = encode(probe).len().saturating_sub(probe);
    encode(MESSAGE_LENGTH_MAX - overhead)
}

/// Answers StartContainer as the attack says, and then never returns (the
/// genuine answer never follows); returns at once when the attack is on
/// another RPC.
pub fn on_start_container(ctx: &TtrpcContext) {
    let stream = ctx.mh.stream_id;
    match attack() {
        Some(Attack::StartBadType) => {
            let payload = vec![0xaa; 16];
            let mut header = response_header(stream, &payload);
            header.type_ = 0x7f;
            header.flags = 0xff;
            send_frame(ctx, header, payload);
        }
        Some(Attack::StartWrongStream) => {
            let payload = Response::default().encode().unwrap_or_default();
            send_frame(
                ctx,
                response_header(stream ^ 0x8000_0000, &payload),
                payload,
            );
        }
        Some(Attack::StartGarbage) => {
            // A field 15 length-delimited claiming 2^32-1 bytes: no protobuf.
            let payload = vec![0x7a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01];
            send_frame(ctx, response_header(stream, &payload), payload);
        }
        Some(Attack::StartHuge) => {
            let payload = huge_error_response();
            send_frame(ctx, response_header(stream, &payload), payload);
        }
        Some(Attack::StartOversized) => {
            let mut header = response_header(stream, &[]);
            header.length = u32::MAX;
            send_frame(ctx, header, Vec::new());
        }
        Some(Attack::StartHang) => {}
        Some(
            Attack::WaitSignal(_)
            | Attack::ExecEscapes
            | Attack::StdinAckBeyond
            | Attack::StdinAckNever,
        )
        | None => return,
    }
    loop {
        std::thread::park();
    }
}

/// Rewrites a WaitProcess answer as the attack says.
pub fn on_wait_process(mut reply: WaitProcessResponse) -> WaitProcessResponse {
    if let Some(Attack::WaitSignal(n)) = attack() {
        reply.exit_code = 0;
        reply.signal = n;
    }
    reply
}

/// The error ExecProcess answers with, if the attack is on it.
pub fn on_exec_process() -> Result<(), ttrpc::Error> {
    match attack() {
        Some(Attack::ExecEscapes) => Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
            Code::INTERNAL,
            format!("exec refused {ESCAPES}end"),
        ))),
        _ => Ok(()),
    }
}

/// The acknowledgement a stdin pump sends for `taken` bytes, if any.
pub fn stdin_ack(taken: u64) -> Option<u64> {
    match attack() {
        Some(Attack::StdinAckBeyond) => Some(u64::MAX),
        Some(Attack::StdinAckNever) => None,
        _ => Some(taken),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attacks_parse_by_name_and_unknown_names_are_refused() {
        assert_eq!("start-hang".parse::<Attack>().ok(), Some(Attack::StartHang));
        assert_eq!(
            "wait-signal-999".parse::<Attack>().ok(),
            Some(Attack::WaitSignal(999))
        );
        assert!("wait-signal-x".parse::<Attack>().is_err());
        assert!("start-everything".parse::<Attack>().is_err());
    }

    #[test]
    fn the_huge_reply_is_exactly_the_largest_frame_and_decodes() {
        let payload = huge_error_response();
        assert_eq!(payload.len(), MESSAGE_LENGTH_MAX);
        let response = Response::decode(&payload).expect("a valid Response");
        let message = &response.status.message;
        assert!(message.starts_with(ESCAPES));
    }
}
