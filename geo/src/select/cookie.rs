//! The `Cookie` header parsing behind `hash:cookie=NAME` (sticky routing, also under `geo+`).
//! Clients send these bytes, so this is fuzzed.
//!
//! Pure code over `std`, so the fuzz crate (`node/fuzz`, target `geo_cookie`) compiles this
//! file alone.

/// The value of cookie `name` in one `Cookie` header value (`a=1; b=2`), without surrounding
/// double quotes. HTTP/2 may split cookies over several headers: try each.
pub fn cookie_value<'a>(header: &'a [u8], name: &str) -> Option<&'a [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        let (k, v) = (&pair[..eq], &pair[eq + 1..]);
        if k.trim_ascii() != name.as_bytes() {
            return None;
        }
        let v = v.trim_ascii();
        Some(match v {
            [b'"', inner @ .., b'"'] => inner,
            _ => v,
        })
    })
}
