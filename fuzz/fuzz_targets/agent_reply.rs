//! Agent replies as the host decodes and uses them. The first byte picks the
//! message; the rest is its protobuf encoding, as a hostile agent sends it.
//! Whatever parses, the host's use of it keeps its invariants: an exit
//! status in 0-255 and a signal it may raise only if it ends a process, a
//! process name without control characters.
#![no_main]

use husk_protocol::agent::{
    GuestInfoResponse, HealthResponse, ListProcessesResponse, StatsResponse, WaitProcessResponse,
};
use husk_runtime::agent::{is_fatal_signal, printable, ProcessExit};
use libfuzzer_sys::fuzz_target;
use protobuf::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => {
            if let Ok(r) = WaitProcessResponse::parse_from_bytes(bytes) {
                let exit = ProcessExit::from_guest(r.exit_code, r.signal);
                assert!((0..=255).contains(&exit.code), "{exit:?}");
                assert!(exit.signal == 0 || is_fatal_signal(exit.signal), "{exit:?}");
                assert!(exit.signal != libc::SIGSTOP, "{exit:?}");
            }
        }
        1 => {
            if let Ok(r) = ListProcessesResponse::parse_from_bytes(bytes) {
                for p in &r.processes {
                    let shown = printable(&p.command, 4096);
                    assert!(!shown.chars().any(char::is_control), "{shown:?}");
                    assert!(shown.chars().count() <= 4097);
                }
            }
        }
        2 => {
            if let Ok(r) = StatsResponse::parse_from_bytes(bytes) {
                // The host scales these; it must never overflow.
                let _ = r.cpu_usage_usec.saturating_mul(1000);
                for key in r.memory_stat.keys() {
                    let _ = printable(key, 256);
                }
            }
        }
        3 => {
            let _ = HealthResponse::parse_from_bytes(bytes);
        }
        _ => {
            if let Ok(r) = GuestInfoResponse::parse_from_bytes(bytes) {
                let _ = r.compute_size();
            }
        }
    }
});
