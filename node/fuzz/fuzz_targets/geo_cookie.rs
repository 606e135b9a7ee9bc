#![no_main]
//! The cookie `hash:cookie=NAME` (and `geo+hash:cookie=NAME`) balances on, read from the
//! client's `Cookie` header. Never panics, answers a part of one pair, and finds a value that
//! was set whatever the client put around it.
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use portcullis_node_fuzz::cookie::cookie_value;

const TCHAR: &[u8] =
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn within(part: &[u8], whole: &[u8]) -> bool {
    let (p, w) = (part.as_ptr() as usize, whole.as_ptr() as usize);
    p >= w && p + part.len() <= w + whole.len()
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    // A cookie name as a policy names it: an RFC 9110 token.
    let len = u.int_in_range(1..=12)?;
    let name: String = (0..len)
        .map(|_| u.choose(TCHAR).map(|&b| b as char))
        .collect::<Result<_>>()?;
    let prefix: Vec<u8> = u.arbitrary()?;
    let value: Vec<u8> = u.arbitrary()?;
    let quoted: bool = u.arbitrary()?;
    let spaced: bool = u.arbitrary()?;
    let suffix = u.bytes(u.len())?;

    let found = cookie_value(&prefix, &name);
    if let Some(v) = found {
        assert!(within(v, &prefix), "the value is a part of the header");
        assert!(!v.contains(&b';'), "the value is inside one pair");
    }
    if found.is_some() {
        return Ok(());
    }
    // Whatever came before (without this cookie) and after, the value is found as set.
    let value: Vec<u8> = value
        .into_iter()
        .filter(|b| !matches!(b, b';' | b'"'))
        .collect();
    let value = value.trim_ascii();
    let mut header = prefix.clone();
    header.extend_from_slice(b"; ");
    header.extend_from_slice(name.as_bytes());
    header.extend_from_slice(if spaced { b" = " } else { b"=" });
    if quoted {
        header.push(b'"');
    }
    header.extend_from_slice(value);
    if quoted {
        header.push(b'"');
    }
    header.push(b';');
    header.extend_from_slice(suffix);
    assert_eq!(cookie_value(&header, &name), Some(value));
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
