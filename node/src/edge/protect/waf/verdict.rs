//! What the engine's messages say: the rules that matched (id, message, severity), the
//! request's anomaly score, and each rule's family for metrics.
//!
//! libmodsecurity reports matches as text lines (`ModSecurity: Warning. Matched … [file "…"]
//! [line "…"] [id "…"] [rev "…"] [msg "…"] [data "…"] [severity "…"] …`). Parts of a line are
//! request bytes (the matched value, the URI), so a request can place look-alike fields in its
//! own messages. Parsing keeps to the structure the engine writes — a `[file` field naming a
//! rule file, then `line`, `id` and `rev` in that order — and the decision to block never
//! depends on it: that comes from the engine's intervention (`portcullis_modsec::Disruption`). At worst a
//! request mislabels its own audit record.

use serde::Serialize;

/// One matched rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Matched {
    pub id: u32,
    pub msg: String,
    pub severity: &'static str,
}

/// The value of `[name "…"]` starting at `s` (which must begin with `[name "`), and the rest
/// after its closing `"]`.
fn field<'a>(s: &'a str, name: &str) -> Option<(&'a str, &'a str)> {
    let rest = s
        .strip_prefix('[')?
        .strip_prefix(name)?
        .strip_prefix(" \"")?;
    let end = rest.find("\"]")?;
    Some((&rest[..end], rest[end + 2..].trim_start()))
}

fn severity_name(n: &str) -> &'static str {
    match n {
        "0" => "EMERGENCY",
        "1" => "ALERT",
        "2" => "CRITICAL",
        "3" => "ERROR",
        "4" => "WARNING",
        "5" => "NOTICE",
        "6" => "INFO",
        "7" => "DEBUG",
        _ => "",
    }
}

/// Parses one engine message; `None` for lines that are not rule matches.
pub fn parse_line(line: &str, rule_file_prefixes: &[String]) -> Option<Matched> {
    // Every occurrence of ` [file "` is a candidate; the first that names one of our rule files
    // and is followed by line, id and rev fields is the engine's own.
    let mut from = 0;
    while let Some(off) = line[from..].find("[file \"") {
        let at = from + off;
        from = at + 1;
        let Some((file, rest)) = field(&line[at..], "file") else {
            continue;
        };
        if !rule_file_prefixes.is_empty()
            && !rule_file_prefixes
                .iter()
                .any(|p| file.starts_with(p.as_str()))
        {
            continue;
        }
        let Some((lineno, rest)) = field(rest, "line") else {
            continue;
        };
        let Some((id, rest)) = field(rest, "id") else {
            continue;
        };
        let (Ok(_), Ok(id)) = (lineno.parse::<u32>(), id.parse::<u32>()) else {
            continue;
        };
        let Some((_, rest)) = field(rest, "rev") else {
            continue;
        };
        let (msg, rest) = field(rest, "msg").unwrap_or(("", rest));
        // `data` is hex-escaped by the engine (no raw quote), so the severity after it is the
        // engine's.
        let rest = field(rest, "data").map_or(rest, |(_, r)| r);
        let severity = field(rest, "severity").map_or("", |(s, _)| severity_name(s));
        return Some(Matched {
            id,
            msg: msg.to_string(),
            severity,
        });
    }
    None
}

/// The request's inbound anomaly score: from CRS's blocking evaluation (949110, "Total Score:
/// N") when the threshold was reached, else the sum CRS adds per matched rule's severity.
pub fn anomaly_score(rules: &[Matched]) -> u32 {
    let reported = rules
        .iter()
        .filter(|r| r.id == 949110 || r.id == 959100)
        .filter_map(|r| {
            let t = r.msg.split("Total Score: ").nth(1)?;
            t.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        })
        .max();
    reported.unwrap_or_else(|| {
        rules
            .iter()
            .filter(|r| (911_000..949_000).contains(&r.id))
            .map(|r| match r.severity {
                "CRITICAL" => 5,
                "ERROR" => 4,
                "WARNING" => 3,
                "NOTICE" => 2,
                _ => 0,
            })
            .sum()
    })
}

/// The metrics label of a rule: its CRS file's attack family.
pub fn family(id: u32) -> &'static str {
    match id / 1000 {
        200 => "body-parser",
        911 => "method",
        913 => "scanner",
        920 => "protocol",
        921 => "protocol-attack",
        922 => "multipart",
        930 => "lfi",
        931 => "rfi",
        932 => "rce",
        933 => "php",
        934 => "generic",
        941 => "xss",
        942 => "sqli",
        943 => "session-fixation",
        944 => "java",
        949 => "inbound-score",
        950..=954 | 956 => "data-leakage",
        955 => "web-shell",
        959 => "outbound-score",
        980 => "correlation",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"ModSecurity: Warning. detected SQLi using libinjection. [file "/crs/rules/REQUEST-942-APPLICATION-ATTACK-SQLI.conf"] [line "46"] [id "942100"] [rev ""] [msg "SQL Injection Attack Detected via libinjection"] [data "Matched Data: s&sos found within ARGS:q: ' or 1=1--"] [severity "2"] [ver "OWASP_CRS/4.28.0"] [maturity "0"] [accuracy "0"] [tag "attack-sqli"] [hostname "127.0.0.1"] [uri "/"] [unique_id "1"] [ref "v8,10"]"#;

    #[test]
    fn a_match_line_gives_id_message_and_severity() {
        let m = parse_line(LINE, &["/crs/".into()]).expect("parsed");
        assert_eq!(m.id, 942100);
        assert_eq!(m.msg, "SQL Injection Attack Detected via libinjection");
        assert_eq!(m.severity, "CRITICAL");
        assert_eq!(family(m.id), "sqli");
        assert_eq!(anomaly_score(&[m]), 5);
        assert_eq!(parse_line("ModSecurity: rules loaded", &[]), None);
    }

    #[test]
    fn look_alike_fields_in_the_matched_value_are_skipped() {
        // The matched value comes first in the line; a fake `[file` naming a path outside the
        // rule files is passed over, and the engine's own fields are found after it.
        let forged = LINE.replace(
            "detected SQLi using libinjection.",
            r#"Matched (Value: `[file "/tmp/x"] [line "1"] [id "1"] [rev ""]' )"#,
        );
        assert_eq!(
            parse_line(&forged, &["/crs/".into()]).map(|m| m.id),
            Some(942100)
        );
    }

    #[test]
    fn the_blocking_evaluation_reports_the_total() {
        let total = Matched {
            id: 949110,
            msg: "Inbound Anomaly Score Exceeded (Total Score: 13)".into(),
            severity: "",
        };
        assert_eq!(anomaly_score(&[total]), 13);
    }
}
