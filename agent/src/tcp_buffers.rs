//! The guest's per-socket TCP buffer ceilings.
//!
//! Linux sizes the largest buffer one TCP socket may grow to
//! (`net.ipv4.tcp_rmem` and `tcp_wmem`, third field) from the memory free
//! when TCP starts, capped at 6 MiB to receive and 4 MiB to send. A husk
//! guest is small (128 MiB by default) and its initramfs is still held at
//! that moment, so its sockets get about 0.8 MiB, where a container under
//! runc gets the host's caps. Under TCG that small receive window cost about
//! a tenth of a stream's throughput into the guest (bench/run.py network).
//! The agent raises the two ceilings to the kernel's caps once at boot; new
//! namespaces copy them from the guest's own. Memory stays bounded by the
//! guest-wide `net.ipv4.tcp_mem`, which the kernel still sizes from the
//! guest's memory and which puts every socket under pressure when reached;
//! a container's own `linux.sysctl` still overrides both.

use std::path::Path;

/// The kernel's cap on a socket's receive buffer ceiling (tcp_init()).
pub const RECEIVE_CEILING: u64 = 6 << 20;
/// The kernel's cap on a socket's send buffer ceiling (tcp_init()).
pub const SEND_CEILING: u64 = 4 << 20;

/// `current` ("min default max", as /proc/sys gives it) with its maximum
/// raised to `ceiling`; None when it is already at least that or is not
/// three numbers (the file is left as the kernel wrote it).
pub fn raised(current: &str, ceiling: u64) -> Option<String> {
    let fields: Vec<u64> = current
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let [min, default, max] = fields[..] else {
        return None;
    };
    (max < ceiling).then(|| format!("{min} {default} {ceiling}"))
}

/// Raises both ceilings in the calling thread's network namespace (at
/// boot: the guest's own). Never lowers one.
pub fn raise_here() -> std::io::Result<()> {
    for (file, ceiling) in [
        ("/proc/sys/net/ipv4/tcp_rmem", RECEIVE_CEILING),
        ("/proc/sys/net/ipv4/tcp_wmem", SEND_CEILING),
    ] {
        let path = Path::new(file);
        if let Some(line) = raised(&std::fs::read_to_string(path)?, ceiling) {
            std::fs::write(path, line)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_maximum_is_raised_and_never_lowered() {
        assert_eq!(
            raised("4096\t131072\t830784\n", RECEIVE_CEILING).as_deref(),
            Some("4096 131072 6291456")
        );
        assert_eq!(raised("4096 16384 8388608", SEND_CEILING), None);
        assert_eq!(raised("4096 16384 4194304", SEND_CEILING), None);
    }

    #[test]
    fn a_line_that_is_not_three_numbers_is_left_alone() {
        for line in ["", "4096 131072", "4096 131072 830784 1", "a b c", "-1 2 3"] {
            assert_eq!(raised(line, RECEIVE_CEILING), None, "{line:?}");
        }
    }
}
