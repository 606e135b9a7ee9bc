//! Reading a TLS ClientHello before any TLS library sees it: the server name (SNI) and the ALPN
//! list decide the route, and for TLS passthrough the raw bytes are relayed to the backend
//! unchanged.
//!
//! `parse_client_hello` is a pure function over the bytes received so far. It answers
//! `Incomplete` until a whole ClientHello handshake message is buffered, which may span several
//! TLS records: post-quantum key shares (ML-KEM) push ClientHellos past one 16 KiB record. It
//! depends on nothing but `std` and `thiserror`, so the fuzz crate can compile this file alone.

/// TLS record content type for handshake messages.
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Largest plaintext record body (RFC 8446 §5.1).
const MAX_RECORD_LEN: usize = 16384;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

/// What the router needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello {
    /// The host name from the server_name extension, lowercased, without a trailing dot.
    pub server_name: Option<String>,
    /// ALPN protocol ids in the client's order of preference.
    pub alpn: Vec<Vec<u8>>,
    /// Bytes of the input that the ClientHello's records occupy; anything after them is the
    /// client's next flight and must be relayed (passthrough) or replayed (termination) too.
    pub consumed: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// More bytes are needed; not an error unless the connection ends or the cap is reached.
    #[error("incomplete client hello")]
    Incomplete,
    #[error("not a TLS handshake record (content type {0})")]
    NotHandshake(u8),
    #[error("TLS record length {0} exceeds the 16384-byte limit")]
    RecordTooLong(usize),
    #[error("first handshake message is type {0}, not a ClientHello")]
    NotClientHello(u8),
    #[error("malformed client hello: {0}")]
    Malformed(&'static str),
}

/// A cursor over a byte slice whose reads fail instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.buf.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a `len_bytes`-byte length prefix.
    fn vec(&mut self, len_bytes: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        let len = match len_bytes {
            1 => usize::from(self.u8(what)?),
            _ => usize::from(self.u16(what)?),
        };
        self.take(len, what)
    }
}

/// Collects handshake bytes from consecutive handshake records until the first handshake
/// message is complete, then parses it.
pub fn parse_client_hello(input: &[u8]) -> Result<ClientHello, HelloError> {
    let mut handshake = Vec::new();
    let mut pos = 0usize;
    loop {
        // Once the 4-byte handshake header is in, its length says when to stop.
        if handshake.len() >= 4 {
            if handshake[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::NotClientHello(handshake[0]));
            }
            let body_len = usize::from(handshake[1]) << 16
                | usize::from(handshake[2]) << 8
                | usize::from(handshake[3]);
            if handshake.len() >= 4 + body_len {
                let mut hello = parse_body(&handshake[4..4 + body_len])?;
                hello.consumed = pos;
                return Ok(hello);
            }
        }
        let Some(header) = input.get(pos..pos + 5) else {
            // A non-handshake first byte is known to be wrong before five bytes arrive.
            return match input.get(pos) {
                Some(&t) if t != CONTENT_HANDSHAKE => Err(HelloError::NotHandshake(t)),
                _ => Err(HelloError::Incomplete),
            };
        };
        if header[0] != CONTENT_HANDSHAKE {
            return Err(HelloError::NotHandshake(header[0]));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_RECORD_LEN {
            return Err(HelloError::RecordTooLong(len));
        }
        if len == 0 {
            // Empty handshake records are forbidden (RFC 8446 §5.1) and would let a client
            // keep us reading forever within the size cap.
            return Err(HelloError::Malformed("empty handshake record"));
        }
        let Some(body) = input.get(pos + 5..pos + 5 + len) else {
            return Err(HelloError::Incomplete);
        };
        handshake.extend_from_slice(body);
        pos += 5 + len;
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader { buf: body };
    r.take(2, "legacy_version")?;
    r.take(32, "random")?;
    r.vec(1, "session_id")?;
    let suites = r.vec(2, "cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher_suites"));
    }
    r.vec(1, "compression_methods")?;
    let mut hello = ClientHello::default();
    if r.buf.is_empty() {
        // A ClientHello without extensions (SSLv3-era clients): no SNI, no ALPN.
        return Ok(hello);
    }
    let mut exts = Reader {
        buf: r.vec(2, "extensions")?,
    };
    let mut seen_sni = false;
    let mut seen_alpn = false;
    while !exts.buf.is_empty() {
        let ty = exts.u16("extension type")?;
        let data = exts.vec(2, "extension data")?;
        match ty {
            EXT_SERVER_NAME => {
                // A repeated extension is a protocol violation and a classic way to make a
                // router and the TLS library disagree about the name.
                if seen_sni {
                    return Err(HelloError::Malformed("duplicate server_name"));
                }
                seen_sni = true;
                hello.server_name = parse_sni(data)?;
            }
            EXT_ALPN => {
                if seen_alpn {
                    return Err(HelloError::Malformed("duplicate alpn"));
                }
                seen_alpn = true;
                hello.alpn = parse_alpn(data)?;
            }
            _ => {}
        }
    }
    Ok(hello)
}

fn parse_sni(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader { buf: data };
    let mut list = Reader {
        buf: r.vec(2, "server_name_list")?,
    };
    let mut name = None;
    while !list.buf.is_empty() {
        let kind = list.u8("server name type")?;
        let value = list.vec(2, "host_name")?;
        // Only host_name (0) is defined; one of them is allowed.
        if kind != 0 {
            continue;
        }
        if name.is_some() {
            return Err(HelloError::Malformed("two host names"));
        }
        name = Some(normalize_host_name(value)?);
    }
    Ok(name)
}

/// Host names travel as ASCII; anything else cannot be a route and is refused here so that
/// later stages only ever see lowercase ASCII.
fn normalize_host_name(raw: &[u8]) -> Result<String, HelloError> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    if raw.is_empty() || raw.len() > 253 {
        return Err(HelloError::Malformed("host name length"));
    }
    if !raw
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.' || *b == b'_')
    {
        return Err(HelloError::Malformed("host name characters"));
    }
    Ok(String::from_utf8_lossy(raw).to_ascii_lowercase())
}

fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut r = Reader { buf: data };
    let mut list = Reader {
        buf: r.vec(2, "alpn list")?,
    };
    let mut out = Vec::new();
    while !list.buf.is_empty() {
        let p = list.vec(1, "alpn protocol")?;
        if p.is_empty() {
            return Err(HelloError::Malformed("empty alpn protocol"));
        }
        out.push(p.to_vec());
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
