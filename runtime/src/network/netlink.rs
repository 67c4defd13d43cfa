//! A synchronous rtnetlink client: one request, its acknowledgement or its
//! dump, on a `NETLINK_ROUTE` socket.
//!
//! The socket belongs to the network namespace it was created in (see
//! [`super::netns::NetNs::run`]), so every request through it acts there,
//! whichever thread sends it. No async runtime is needed for a handful of
//! requests at sandbox start and stop, so none is used (the `rtnetlink`
//! crate would bring tokio); the messages themselves are
//! `netlink-packet-route`'s.

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {what}: {source}")]
    Socket {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("netlink: {what}: {source}")]
    Kernel {
        what: String,
        source: std::io::Error,
    },
    #[error("netlink: {what}: undecodable answer: {detail}")]
    Decode { what: String, detail: String },
}

impl NetlinkError {
    /// The kernel's errno for a refused request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A `NETLINK_ROUTE` socket, connected to the kernel.
pub struct RouteSocket {
    socket: Socket,
    sequence: u32,
}

impl RouteSocket {
    /// A socket in the calling thread's network namespace.
    pub fn new() -> Result<RouteSocket, NetlinkError> {
        let socket_err = |what| move |source| NetlinkError::Socket { what, source };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(socket_err("creating"))?;
        socket.bind_auto().map_err(socket_err("binding"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(socket_err("connecting"))?;
        Ok(RouteSocket {
            socket,
            sequence: 0,
        })
    }

    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<u32, NetlinkError> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket
            .send(&buf, 0)
            .map_err(|source| NetlinkError::Socket {
                what: "sending",
                source,
            })?;
        Ok(self.sequence)
    }

    /// Receives the answers to request `sequence` and hands each message to
    /// `each`, until the acknowledgement (or the end of a dump).
    fn receive(
        &mut self,
        what: &str,
        sequence: u32,
        mut each: impl FnMut(RouteNetlinkMessage),
    ) -> Result<(), NetlinkError> {
        loop {
            let (buf, _) = self
                .socket
                .recv_from_full()
                .map_err(|source| NetlinkError::Socket {
                    what: "receiving",
                    source,
                })?;
            let mut offset = 0;
            while offset < buf.len() {
                let packet = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..])
                    .map_err(|e| NetlinkError::Decode {
                        what: what.to_string(),
                        detail: e.to_string(),
                    })?;
                let length = packet.header.length as usize;
                if length == 0 {
                    return Err(NetlinkError::Decode {
                        what: what.to_string(),
                        detail: "a message of length 0".into(),
                    });
                }
                offset += (length + 3) & !3;
                if packet.header.sequence_number != sequence {
                    continue; // an answer to an earlier request
                }
                match packet.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(_) => Err(NetlinkError::Kernel {
                                what: what.to_string(),
                                source: e.to_io(),
                            }),
                        }
                    }
                    NetlinkPayload::InnerMessage(message) => each(message),
                    _ => {}
                }
            }
        }
    }

    /// Sends a request that changes something and waits for the kernel's
    /// acknowledgement; `what` names it in the error.
    pub fn request(
        &mut self,
        what: &str,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(), NetlinkError> {
        let sequence = self.send(message, flags | NLM_F_ACK)?;
        self.receive(what, sequence, |_| {})
    }

    /// Sends a dump request and returns every object of the answer.
    pub fn dump(
        &mut self,
        what: &str,
        message: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let sequence = self.send(message, NLM_F_DUMP)?;
        let mut all = Vec::new();
        self.receive(what, sequence, |m| all.push(m))?;
        Ok(all)
    }
}
