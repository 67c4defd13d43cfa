//! The header a guest sends first on every stream connection: whatever the
//! host accepts must be a header it could have encoded itself.
#![no_main]

use husk_protocol::stream::{StreamHeader, StreamKind, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = data;
    let Ok(header) = StreamHeader::read_from(&mut reader) else {
        return;
    };
    // It consumed exactly one header, no more.
    assert_eq!(reader.len(), data.len() - HEADER_LEN);
    // What decodes re-encodes to a header that decodes the same.
    let again = StreamHeader::decode(&header.encode()).expect("re-decoding an encoded header");
    assert_eq!(again, header);
    if header.kind == StreamKind::Process {
        assert_ne!(header.token, 0);
    }
});
