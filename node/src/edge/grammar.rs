//! The routing grammar: what a host name asks for, before looking at which apps exist.
//!
//! | host                         | parsed as                                        |
//! |------------------------------|--------------------------------------------------|
//! | `<label>.<base>`             | `Base { label }`: an instance id or an app name  |
//! | `<name>-<port>.<base>`       | the same, with a port                            |
//! | `<name>-<port>s.<base>`      | TLS passthrough to that port                     |
//! | `<name>-<port>g.<base>`      | HTTP/2-only (h2c, gRPC) backend                  |
//! | `<cvm-id>.internal`          | `Internal`: operators' debugging, trusted only   |
//! | anything else                | `Custom`: looked up among custom domains         |
//!
//! Only the first label is parsed, and only directly under a configured base domain: a deeper
//! name (`a.b.<base>`) is not a route. The whole first label is kept as well, because instance ids
//! are checked before app names and may themselves end in `-<digits>`.
//!
//! Pure code over `std` and `thiserror`, so the fuzz crate can compile this file alone.

/// How the backend is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Terminate TLS here; HTTP/1.1 to the backend.
    Http,
    /// Relay the TLS bytes; the backend terminates TLS itself (suffix `s`).
    Passthrough,
    /// Terminate TLS here; HTTP/2 with prior knowledge (h2c) to the backend (suffix `g`).
    H2c,
}

/// The first label under a base domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// The label as written (lowercase), e.g. `myapp-8080s`.
    pub whole: String,
    /// The name part, e.g. `myapp`; equal to `whole` when no `-<port>` suffix is present.
    pub name: String,
    pub port: Option<u16>,
    pub mode: Mode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedHost {
    /// Directly under base domain number `base` (index into the list given to `parse_host`).
    Base {
        base: usize,
        label: Label,
    },
    Internal {
        cvm_id: String,
    },
    /// Not under any base domain: a custom domain candidate.
    Custom {
        host: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    #[error("host {0:?} is not a valid DNS name")]
    InvalidHost(String),
    #[error("label {0:?} has both the 's' (passthrough) and 'g' (h2c) suffixes")]
    BothSuffixes(String),
    #[error("label {0:?} names port 0 or a port above 65535")]
    InvalidPort(String),
    #[error("host {0:?} is a base domain itself, not an app")]
    BaseApex(String),
    #[error("host {0:?} is more than one label below base domain {1:?}")]
    TooDeep(String, String),
}

/// Lowercases and strips a trailing dot; refuses anything that is not a DNS name.
pub fn normalize_host(host: &str) -> Result<String, GrammarError> {
    let h = host.strip_suffix('.').unwrap_or(host);
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !ok {
        return Err(GrammarError::InvalidHost(host.to_string()));
    }
    Ok(h.to_ascii_lowercase())
}

/// Parses `host` against the base domains `bases` (lowercase, no trailing dot). When bases nest
/// (`apps.example.com` and `example.com`), the longest matching base wins.
pub fn parse_host(host: &str, bases: &[String]) -> Result<ParsedHost, GrammarError> {
    let host = normalize_host(host)?;
    if let Some(cvm) = host.strip_suffix(".internal") {
        if !cvm.contains('.') {
            return Ok(ParsedHost::Internal {
                cvm_id: cvm.to_string(),
            });
        }
    }
    let mut best: Option<(usize, &str)> = None;
    for (i, base) in bases.iter().enumerate() {
        if host == *base {
            return Err(GrammarError::BaseApex(host));
        }
        let Some(prefix) = host
            .strip_suffix(base.as_str())
            .and_then(|p| p.strip_suffix('.'))
        else {
            continue;
        };
        if best.is_none_or(|(j, _)| bases[j].len() < base.len()) {
            best = Some((i, prefix));
        }
    }
    let Some((base, prefix)) = best else {
        return Ok(ParsedHost::Custom { host });
    };
    if prefix.contains('.') {
        return Err(GrammarError::TooDeep(host.clone(), bases[base].clone()));
    }
    Ok(ParsedHost::Base {
        base,
        label: parse_label(prefix)?,
    })
}

/// Splits `<name>-<port>[s|g]`; a label without that shape is all name.
pub fn parse_label(label: &str) -> Result<Label, GrammarError> {
    let plain = || Label {
        whole: label.to_string(),
        name: label.to_string(),
        port: None,
        mode: Mode::Http,
    };
    let Some((name, tail)) = label.rsplit_once('-') else {
        return Ok(plain());
    };
    let digits_end = tail.bytes().take_while(u8::is_ascii_digit).count();
    let (digits, suffix) = tail.split_at(digits_end);
    if name.is_empty() || digits.is_empty() || !matches!(suffix, "" | "s" | "g" | "sg" | "gs") {
        return Ok(plain());
    }
    let mode = match suffix {
        "" => Mode::Http,
        "s" => Mode::Passthrough,
        "g" => Mode::H2c,
        _ => return Err(GrammarError::BothSuffixes(label.to_string())),
    };
    let port = match digits.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) && !digits.starts_with('0') => p as u16,
        _ => return Err(GrammarError::InvalidPort(label.to_string())),
    };
    Ok(Label {
        whole: label.to_string(),
        name: name.to_string(),
        port: Some(port),
        mode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bases() -> Vec<String> {
        vec![
            "example.com".into(),
            "apps.example.com".into(),
            "portcullis.localhost".into(),
        ]
    }

    fn label(host: &str) -> Label {
        match parse_host(host, &bases()) {
            Ok(ParsedHost::Base { label, .. }) => label,
            other => panic!("{host}: {other:?}"),
        }
    }

    #[test]
    fn patterns() {
        let l = label("MyApp.portcullis.localhost.");
        assert_eq!(
            (l.name.as_str(), l.port, l.mode),
            ("myapp", None, Mode::Http)
        );
        let l = label("myapp-8080.apps.example.com");
        assert_eq!(
            (l.name.as_str(), l.port, l.mode),
            ("myapp", Some(8080), Mode::Http)
        );
        let l = label("my-app-443s.example.com");
        assert_eq!(
            (l.name.as_str(), l.port, l.mode, l.whole.as_str()),
            ("my-app", Some(443), Mode::Passthrough, "my-app-443s")
        );
        let l = label("grpc-50051g.example.com");
        assert_eq!((l.port, l.mode), (Some(50051), Mode::H2c));
        // Not a port suffix: the whole label is the name.
        let l = label("my-app.example.com");
        assert_eq!((l.name.as_str(), l.port), ("my-app", None));
        let l = label("my-app-x1.example.com");
        assert_eq!((l.name.as_str(), l.port), ("my-app-x1", None));
    }

    #[test]
    fn longest_base_wins() {
        match parse_host("a.apps.example.com", &bases()) {
            Ok(ParsedHost::Base { base, .. }) => assert_eq!(bases()[base], "apps.example.com"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_and_other_kinds() {
        let b = bases();
        assert_eq!(
            parse_host("a-443sg.example.com", &b),
            Err(GrammarError::BothSuffixes("a-443sg".into()))
        );
        assert_eq!(
            parse_host("a-0.example.com", &b),
            Err(GrammarError::InvalidPort("a-0".into()))
        );
        assert_eq!(
            parse_host("a-65536.example.com", &b),
            Err(GrammarError::InvalidPort("a-65536".into()))
        );
        assert_eq!(
            parse_host("a-080.example.com", &b),
            Err(GrammarError::InvalidPort("a-080".into()))
        );
        assert_eq!(
            parse_host("example.com", &b),
            Err(GrammarError::BaseApex("example.com".into()))
        );
        assert!(matches!(
            parse_host("x.y.portcullis.localhost", &b),
            Err(GrammarError::TooDeep(..))
        ));
        assert!(matches!(
            parse_host("bad host", &b),
            Err(GrammarError::InvalidHost(_))
        ));
        assert!(matches!(
            parse_host("", &b),
            Err(GrammarError::InvalidHost(_))
        ));
        assert_eq!(
            parse_host("cvm-1.internal", &b),
            Ok(ParsedHost::Internal {
                cvm_id: "cvm-1".into()
            })
        );
        assert_eq!(
            parse_host("api.mycompany.com", &b),
            Ok(ParsedHost::Custom {
                host: "api.mycompany.com".into()
            })
        );
    }

    fn app_name() -> impl Strategy<Value = String> {
        // Valid app names: DNS labels whose last '-' segment is not a port.
        "[a-z][a-z0-9]{0,10}(-[a-z][a-z0-9]{0,5}){0,2}"
    }

    proptest! {
        #[test]
        fn never_panics(host in ".{0,80}") {
            let _ = parse_host(&host, &bases());
        }

        #[test]
        fn never_panics_on_dns_like(host in "[a-z0-9.-]{0,40}(\\.example\\.com)?") {
            let _ = parse_host(&host, &bases());
        }

        #[test]
        fn roundtrip(name in app_name(), port in proptest::option::of(1u16..), mode in 0u8..3) {
            let mode = [Mode::Http, Mode::Passthrough, Mode::H2c][usize::from(mode)];
            let label = match (port, mode) {
                (None, _) => name.clone(),
                (Some(p), Mode::Http) => format!("{name}-{p}"),
                (Some(p), Mode::Passthrough) => format!("{name}-{p}s"),
                (Some(p), Mode::H2c) => format!("{name}-{p}g"),
            };
            let parsed = parse_host(&format!("{label}.portcullis.localhost"), &bases()).expect("parse");
            let ParsedHost::Base { label: l, .. } = parsed else { panic!("not base") };
            prop_assert_eq!(&l.whole, &label);
            prop_assert_eq!(&l.name, &name);
            prop_assert_eq!(l.port, port);
            prop_assert_eq!(l.mode, if port.is_some() { mode } else { Mode::Http });
        }

        #[test]
        fn both_suffixes_always_error(name in app_name(), port in 1u16.., gs in proptest::bool::ANY) {
            let label = format!("{name}-{port}{}", if gs { "gs" } else { "sg" });
            prop_assert_eq!(parse_host(&format!("{label}.example.com"), &bases()), Err(GrammarError::BothSuffixes(label)));
        }
    }
}
