use super::*;
use proptest::prelude::*;

/// Builds a ClientHello handshake message with the given extensions.
fn hello_body(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut b = vec![3, 3];
    b.extend_from_slice(&[7u8; 32]);
    b.push(0); // session id
    b.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    b.extend_from_slice(&[1, 0]); // null compression
    let mut ext_bytes = Vec::new();
    for (ty, data) in exts {
        ext_bytes.extend_from_slice(&ty.to_be_bytes());
        ext_bytes.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext_bytes.extend_from_slice(data);
    }
    b.extend_from_slice(&(ext_bytes.len() as u16).to_be_bytes());
    b.extend_from_slice(&ext_bytes);
    let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
    let len = b.len() as u32;
    msg.extend_from_slice(&len.to_be_bytes()[1..]);
    msg.extend_from_slice(&b);
    msg
}

/// Splits a handshake message into records of at most `max` bytes.
fn records(msg: &[u8], max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in msg.chunks(max) {
        out.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

fn sni_ext(name: &str) -> (u16, Vec<u8>) {
    let mut entry = vec![0u8];
    entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
    entry.extend_from_slice(name.as_bytes());
    let mut d = (entry.len() as u16).to_be_bytes().to_vec();
    d.extend_from_slice(&entry);
    (EXT_SERVER_NAME, d)
}

fn alpn_ext(protos: &[&[u8]]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for p in protos {
        list.push(p.len() as u8);
        list.extend_from_slice(p);
    }
    let mut d = (list.len() as u16).to_be_bytes().to_vec();
    d.extend_from_slice(&list);
    (EXT_ALPN, d)
}

#[test]
fn reads_sni_and_alpn() {
    let msg = hello_body(&[
        sni_ext("MyApp.Example.com."),
        alpn_ext(&[b"h2", b"http/1.1"]),
    ]);
    let bytes = records(&msg, MAX_RECORD_LEN);
    let h = parse_client_hello(&bytes).expect("parse");
    assert_eq!(h.server_name.as_deref(), Some("myapp.example.com"));
    assert_eq!(h.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    assert_eq!(h.consumed, bytes.len());
}

#[test]
fn every_prefix_is_incomplete() {
    let msg = hello_body(&[sni_ext("a.example.com")]);
    let bytes = records(&msg, 40);
    for n in 0..bytes.len() {
        assert_eq!(
            parse_client_hello(&bytes[..n]),
            Err(HelloError::Incomplete),
            "prefix {n}"
        );
    }
    assert!(parse_client_hello(&bytes).is_ok());
}

#[test]
fn large_post_quantum_sized_hello_spans_records() {
    // A 20 KiB key share: bigger than one record, as ML-KEM hybrids with several shares are.
    let msg = hello_body(&[(51, vec![0xab; 20 * 1024]), sni_ext("big.example.com")]);
    let mut bytes = records(&msg, MAX_RECORD_LEN);
    let hello_len = bytes.len();
    bytes.extend_from_slice(b"\x14\x03\x03\x00\x01\x01"); // the next flight stays unconsumed
    let h = parse_client_hello(&bytes).expect("parse");
    assert_eq!(h.server_name.as_deref(), Some("big.example.com"));
    assert_eq!(h.consumed, hello_len);
}

#[test]
fn refuses_non_tls_and_bad_records() {
    assert_eq!(
        parse_client_hello(b"GET / HTTP/1.1\r\n"),
        Err(HelloError::NotHandshake(b'G'))
    );
    assert_eq!(
        parse_client_hello(b"G"),
        Err(HelloError::NotHandshake(b'G'))
    );
    assert_eq!(
        parse_client_hello(&[22, 3, 1, 0xff, 0xff]),
        Err(HelloError::RecordTooLong(0xffff))
    );
    assert!(matches!(
        parse_client_hello(&[22, 3, 1, 0, 0]),
        Err(HelloError::Malformed(_))
    ));
    let server_hello = records(&[2, 0, 0, 0], 100);
    assert_eq!(
        parse_client_hello(&server_hello),
        Err(HelloError::NotClientHello(2))
    );
}

#[test]
fn refuses_duplicate_sni_and_bad_names() {
    let dup = records(
        &hello_body(&[sni_ext("a.example.com"), sni_ext("b.example.com")]),
        MAX_RECORD_LEN,
    );
    assert!(matches!(
        parse_client_hello(&dup),
        Err(HelloError::Malformed(_))
    ));
    let bad = records(&hello_body(&[sni_ext("a b.example.com")]), MAX_RECORD_LEN);
    assert!(matches!(
        parse_client_hello(&bad),
        Err(HelloError::Malformed(_))
    ));
}

#[test]
fn hello_without_extensions_has_no_name() {
    let mut msg = hello_body(&[]);
    // Drop the (empty) extensions block entirely.
    msg.truncate(msg.len() - 2);
    let body_len = (msg.len() - 4) as u32;
    msg[1..4].copy_from_slice(&body_len.to_be_bytes()[1..]);
    let h = parse_client_hello(&records(&msg, MAX_RECORD_LEN)).expect("parse");
    assert_eq!(h.server_name, None);
}

#[test]
fn real_rustls_client_hello() {
    use std::sync::Arc;
    let roots = rustls::RootCertStore::empty();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("web.portcullis.localhost").expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("client");
    let mut bytes = Vec::new();
    conn.write_tls(&mut bytes).expect("write");
    let h = parse_client_hello(&bytes).expect("parse");
    assert_eq!(h.server_name.as_deref(), Some("web.portcullis.localhost"));
    assert_eq!(h.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
}

proptest! {
    #[test]
    fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_client_hello(&bytes);
    }

    #[test]
    fn never_panics_on_handshake_prefix(mut bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        // Valid record framing, random content: reaches the extension parser.
        let len = bytes.len() as u16;
        let mut input = vec![CONTENT_HANDSHAKE, 3, 1];
        input.extend_from_slice(&len.to_be_bytes());
        if !bytes.is_empty() { bytes[0] = HANDSHAKE_CLIENT_HELLO; }
        input.extend_from_slice(&bytes);
        let _ = parse_client_hello(&input);
    }

    #[test]
    fn any_record_split_parses_the_same(split in 1usize..300, name in "[a-z]{1,20}\\.[a-z]{2,10}") {
        let msg = hello_body(&[sni_ext(&name), alpn_ext(&[b"h2"])]);
        let h = parse_client_hello(&records(&msg, split)).expect("parse");
        prop_assert_eq!(h.server_name, Some(name));
    }
}
