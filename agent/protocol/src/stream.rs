//! The header that opens every stream connection to [`crate::STREAM_PORT`].
//!
//! Layout (16 bytes, little endian): magic `HUSK`, version (1 byte), kind
//! (1 byte), two reserved zero bytes, token (u64).

use std::io::{Read, Write};

/// Size of an encoded [`StreamHeader`].
pub const HEADER_LEN: usize = 16;
const MAGIC: &[u8; 4] = b"HUSK";
const VERSION: u8 = 1;

/// Flow control on a process's stdin stream, host to guest. The agent
/// writes back, on the same connection, the running count of bytes it has
/// taken out of it (a u64, little endian) each time [`STDIN_ACK_EVERY`] more
/// have been taken; the host keeps at most [`STDIN_WINDOW`] bytes sent and
/// not yet counted. Why: the guest socket's receive buffer (256 KiB, the
/// AF_VSOCK default) then never fills while the process is slower than the
/// sender; a full one has the vsock backend ask the guest for credit, and
/// the guest answer that it has none, back to back until the process reads,
/// on the guest's one CPU. The count is a hint the host checks (never more
/// than it sent, never backwards); a guest that does not send it only stalls
/// its own stdin.
pub const STDIN_WINDOW: u64 = 192 * 1024;
/// How many taken bytes the agent acknowledges at once (see
/// [`STDIN_WINDOW`]; less than it, so a full window is always acknowledged).
pub const STDIN_ACK_EVERY: u64 = STDIN_WINDOW / 4;
/// Size of one stdin acknowledgement.
pub const STDIN_ACK_LEN: usize = 8;
const _: () = assert!(STDIN_ACK_EVERY > 0 && STDIN_ACK_EVERY < STDIN_WINDOW);

/// What a stream connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// A process's stdin, stdout, stderr or pty, named by its token in a
    /// CreateContainer or ExecProcess request.
    Process,
    /// Diagnostics: the agent writes back every byte it reads, then closes.
    Echo,
    /// Measurement, host to guest: the agent reads and discards as many
    /// bytes as the header's token says, answers with one byte once it has
    /// them all, and closes (a half-close from the host would not do: the
    /// vsock backend drops a half-closed connection's pending data).
    Sink,
    /// Measurement, guest to host: the agent writes as many zero bytes as
    /// the header's token says, then closes. The host counts what arrives
    /// and stops at the count it asked for; it trusts nothing else.
    Source,
}

impl StreamKind {
    fn code(self) -> u8 {
        match self {
            StreamKind::Process => 1,
            StreamKind::Echo => 2,
            StreamKind::Sink => 3,
            StreamKind::Source => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(StreamKind::Process),
            2 => Some(StreamKind::Echo),
            3 => Some(StreamKind::Sink),
            4 => Some(StreamKind::Source),
            _ => None,
        }
    }
}

/// Errors reading a stream header.
#[derive(Debug, thiserror::Error)]
pub enum StreamHeaderError {
    /// The connection failed or closed before a whole header arrived.
    #[error("stream header: {0}")]
    Io(#[from] std::io::Error),
    /// The first four bytes were not `HUSK`.
    #[error("stream header: bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// A header version this side does not speak.
    #[error("stream header: unsupported version {0}")]
    BadVersion(u8),
    /// An unknown stream kind.
    #[error("stream header: unknown kind {0}")]
    BadKind(u8),
    /// Process streams need a non-zero token.
    #[error("stream header: process stream with token 0")]
    ZeroToken,
}

/// The first bytes of a stream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    /// What the stream carries.
    pub kind: StreamKind,
    /// For process streams: the token named in the request that uses it;
    /// for [`StreamKind::Sink`] and [`StreamKind::Source`]: how many bytes
    /// the agent receives or sends.
    pub token: u64,
}

impl StreamHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut buf = [0u8; HEADER_LEN];
        buf[..4].copy_from_slice(MAGIC);
        buf[4] = VERSION;
        buf[5] = self.kind.code();
        buf[8..].copy_from_slice(&self.token.to_le_bytes());
        buf
    }

    /// Decodes a header, refusing anything malformed.
    pub fn decode(buf: &[u8; HEADER_LEN]) -> Result<Self, StreamHeaderError> {
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&buf[..4]);
        if &magic != MAGIC {
            return Err(StreamHeaderError::BadMagic(magic));
        }
        if buf[4] != VERSION {
            return Err(StreamHeaderError::BadVersion(buf[4]));
        }
        let kind = StreamKind::from_code(buf[5]).ok_or(StreamHeaderError::BadKind(buf[5]))?;
        let mut token = [0u8; 8];
        token.copy_from_slice(&buf[8..]);
        let token = u64::from_le_bytes(token);
        if kind == StreamKind::Process && token == 0 {
            return Err(StreamHeaderError::ZeroToken);
        }
        Ok(StreamHeader { kind, token })
    }

    /// Writes the header to a connection.
    pub fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(&self.encode())
    }

    /// Reads and decodes a header from a connection.
    pub fn read_from(r: &mut impl Read) -> Result<Self, StreamHeaderError> {
        let mut buf = [0u8; HEADER_LEN];
        r.read_exact(&mut buf)?;
        Self::decode(&buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for kind in [
            StreamKind::Process,
            StreamKind::Echo,
            StreamKind::Sink,
            StreamKind::Source,
        ] {
            let h = StreamHeader {
                kind,
                token: 0x0102_0304_0506_0708,
            };
            let decoded = StreamHeader::read_from(&mut &h.encode()[..]).unwrap();
            assert_eq!(decoded, h);
        }
    }

    #[test]
    fn rejects_malformed_headers() {
        let good = StreamHeader {
            kind: StreamKind::Echo,
            token: 0,
        }
        .encode();

        let mut bad = good;
        bad[0] = b'X';
        assert!(matches!(
            StreamHeader::decode(&bad),
            Err(StreamHeaderError::BadMagic(_))
        ));

        let mut bad = good;
        bad[4] = 9;
        assert!(matches!(
            StreamHeader::decode(&bad),
            Err(StreamHeaderError::BadVersion(9))
        ));

        let mut bad = good;
        bad[5] = 77;
        assert!(matches!(
            StreamHeader::decode(&bad),
            Err(StreamHeaderError::BadKind(77))
        ));

        let mut bad = good;
        bad[5] = 1; // a process stream without a token
        assert!(matches!(
            StreamHeader::decode(&bad),
            Err(StreamHeaderError::ZeroToken)
        ));
    }

    #[test]
    fn short_header_is_an_io_error() {
        let short = [b'H', b'U', b'S'];
        assert!(matches!(
            StreamHeader::read_from(&mut &short[..]),
            Err(StreamHeaderError::Io(_))
        ));
    }
}
