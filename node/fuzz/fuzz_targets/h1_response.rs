#![no_main]
//! A backend's response, as the direct client reads it: heads (informational ones skipped),
//! then a chunked body. Every step must consume input or ask for more, never panic.
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis_node_fuzz::h1wire::{decode_chunk, parse_head, Chunk, Decoded, Framing, Parsed};

fuzz_target!(|data: &[u8]| {
    // The first byte picks a HEAD request and where the input is split, as if it arrived in
    // two reads.
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let head_request = pick & 1 == 1;
    let split = (pick as usize >> 1).min(rest.len());
    let mut buf = BytesMut::from(&rest[..split]);
    let mut pending = &rest[split..];
    let framing = loop {
        let before = buf.len();
        match parse_head(&mut buf, head_request) {
            Ok(Parsed::Final(_, framing)) => break framing,
            Ok(Parsed::Informational) => assert!(buf.len() < before, "a 1xx head is consumed"),
            Ok(Parsed::Partial) if !pending.is_empty() => {
                buf.extend_from_slice(pending);
                pending = &[];
            }
            Ok(Parsed::Partial) | Err(_) => return,
        }
    };
    buf.extend_from_slice(pending);
    let Framing::Chunked { mut state, .. } = framing else {
        return;
    };
    let mut data_bytes = 0;
    let total = buf.len();
    loop {
        let before = (buf.len(), state);
        match decode_chunk(&mut buf, &mut state) {
            Ok(Decoded::Data(d)) => data_bytes += d.len(),
            Ok(Decoded::Trailers(_)) => assert_eq!(state, Chunk::Done),
            Ok(Decoded::Progress) if state == Chunk::Done => return,
            Ok(Decoded::Progress) => assert_ne!(before, (buf.len(), state), "progress moves"),
            Ok(Decoded::NeedMore) | Err(_) => break,
        }
        assert!(data_bytes <= total);
    }
});
