use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use mmdb_writer::{IpVersion, Value, Writer};

use super::*;

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/dbip-country.mmdb")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// Builds an MMDB in memory from `(network, record)` pairs.
fn mmdb(database_type: &str, version: IpVersion, records: Vec<(&str, Value)>) -> Vec<u8> {
    let mut w = Writer::builder(database_type).ip_version(version).build();
    for (net, value) in records {
        let net: IpNet = net.parse().expect("test network");
        w.insert_value(net, value).expect("insert");
    }
    w.to_bytes().expect("serialise")
}

fn city(lat: f64, lon: f64, iso: &str) -> Value {
    Value::map([
        (
            "city",
            Value::map([("names", Value::map([("en", Value::from("Somewhere"))]))]),
        ),
        (
            "location",
            Value::map([
                ("accuracy_radius", Value::from(20_u16)),
                ("latitude", Value::from(lat)),
                ("longitude", Value::from(lon)),
                ("time_zone", Value::from("Europe/Berlin")),
            ]),
        ),
        (
            "country",
            Value::map([
                ("geoname_id", Value::from(2_921_044_u32)),
                ("iso_code", Value::from(iso)),
                ("names", Value::map([("en", Value::from("Germany"))])),
            ]),
        ),
        (
            "subdivisions",
            Value::array([Value::map([("iso_code", Value::from("BE"))])]),
        ),
    ])
}

fn db(records: Vec<(&str, Value)>) -> GeoDb {
    GeoDb::from_bytes(mmdb("Test-City", IpVersion::V6, records), "test.mmdb")
        .expect("test database opens")
}

// ---- the bundled DB-IP Lite country database ----

#[test]
fn bundled_database_locates_well_known_addresses() {
    let db = GeoDb::open(bundled()).expect("bundled database opens");
    let cases = [
        ("8.8.8.8", "US"),         // Google Public DNS
        ("1.1.1.1", "AU"),         // APNIC research prefix, announced by Cloudflare
        ("193.99.144.80", "DE"),   // heise.de
        ("2a01:4f8::1", "DE"),     // Hetzner
        ("203.178.141.194", "JP"), // WIDE project
        ("2001:200::1", "JP"),     // WIDE project
        ("81.2.69.142", "GB"),
        ("2001:41d0::1", "FR"), // OVH
    ];
    for (addr, want) in cases {
        let loc = db
            .lookup(ip(addr))
            .unwrap_or_else(|| panic!("{addr} not found"));
        assert_eq!(loc.country.as_deref(), Some(want), "{addr}");
        assert_eq!(loc.precision, Precision::CountryCentroid, "{addr}");
        assert_eq!(
            Some((loc.lat, loc.lon)),
            crate::country_centroid(want),
            "{addr}"
        );
    }
}

#[test]
fn bundled_database_has_no_location_for_private_addresses() {
    let db = GeoDb::open(bundled()).expect("bundled database opens");
    for addr in ["10.0.0.1", "127.0.0.1", "192.168.1.1", "::1", "fe80::1"] {
        assert_eq!(db.lookup(ip(addr)), None, "{addr}");
    }
}

#[test]
fn ipv4_mapped_addresses_are_looked_up_as_ipv4() {
    // The bundled file has no ::ffff:0:0/96 alias, so this only works via canonicalisation.
    let db = GeoDb::open(bundled()).expect("bundled database opens");
    let loc = db
        .lookup(ip("::ffff:8.8.8.8"))
        .expect("mapped address found");
    assert_eq!(loc.country.as_deref(), Some("US"));
}

#[test]
fn every_country_in_the_bundled_database_has_a_centroid() {
    let reader = Reader::open_readfile(bundled()).expect("bundled database opens");
    let mut codes = BTreeSet::new();
    for item in reader.networks(Default::default()).expect("iterate") {
        let record = item
            .expect("network")
            .decode::<Record>()
            .expect("decode")
            .expect("record");
        if let Some(code) = record.country() {
            codes.insert(code);
        }
    }
    assert!(codes.len() > 240, "only {} countries", codes.len());
    let missing: Vec<String> = codes
        .iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .filter(|c| centroid(c).is_none())
        .collect();
    assert!(missing.is_empty(), "no centroid for {missing:?}");
}

// ---- schemas, with databases written here ----

#[test]
fn city_schema_uses_record_coordinates() {
    let db = db(vec![("89.160.20.0/24", city(52.52, 13.405, "DE"))]);
    let loc = db.lookup(ip("89.160.20.128")).expect("found");
    assert_eq!(
        loc,
        Location {
            lat: 52.52,
            lon: 13.405,
            country: Some("DE".into()),
            precision: Precision::Coordinates,
        }
    );
    assert_eq!(db.lookup(ip("89.160.21.1")), None);
    assert_eq!(db.database_type(), "Test-City");
}

#[test]
fn country_schemas_fall_back_to_the_centroid() {
    let nested = Value::map([("country", Value::map([("iso_code", Value::from("JP"))]))]);
    let flat = Value::map([("country_code", Value::from("br"))]);
    let registered = Value::map([(
        "registered_country",
        Value::map([("iso_code", Value::from("NZ"))]),
    )]);
    let ipinfo = Value::map([("country", Value::from("FR")), ("asn", Value::from("AS1"))]);
    let db = db(vec![
        ("192.0.2.0/26", nested),
        ("192.0.2.64/26", flat),
        ("192.0.2.128/26", registered),
        ("2001:db8::/32", ipinfo),
    ]);
    for (addr, code) in [
        ("192.0.2.1", "JP"),
        ("192.0.2.65", "BR"),
        ("192.0.2.129", "NZ"),
        ("2001:db8::5", "FR"),
    ] {
        let loc = db.lookup(ip(addr)).unwrap_or_else(|| panic!("{addr}"));
        assert_eq!(loc.country.as_deref(), Some(code), "{addr}");
        assert_eq!(loc.precision, Precision::CountryCentroid);
        assert_eq!(Some((loc.lat, loc.lon)), centroid(code), "{addr}");
    }
}

#[test]
fn country_beats_registered_country_and_flat_coordinates_work() {
    let both = Value::map([
        (
            "registered_country",
            Value::map([("iso_code", Value::from("US"))]),
        ),
        ("country", Value::map([("iso_code", Value::from("SG"))])),
    ]);
    let flat_coords = Value::map([
        ("latitude", Value::from(-33.87)),
        ("longitude", Value::from(151.21)),
        ("country_code", Value::from("AU")),
    ]);
    let db = db(vec![
        ("198.51.100.0/25", both),
        ("198.51.100.128/25", flat_coords),
    ]);
    let sg = db.lookup(ip("198.51.100.1")).expect("found");
    assert_eq!(sg.country.as_deref(), Some("SG"));
    let au = db.lookup(ip("198.51.100.200")).expect("found");
    assert_eq!(
        (au.lat, au.lon, au.precision),
        (-33.87, 151.21, Precision::Coordinates)
    );
}

#[test]
fn bad_values_are_ignored_not_fatal() {
    let out_of_range = Value::map([
        (
            "location",
            Value::map([
                ("latitude", Value::from(123.0)),
                ("longitude", Value::from(10.0)),
            ]),
        ),
        ("country", Value::map([("iso_code", Value::from("IT"))])),
    ]);
    let names_only = Value::map([
        ("country", Value::from("Germany")),
        ("location", Value::from("somewhere")),
    ]);
    let unknown_code = Value::map([("country_code", Value::from("ZZ"))]);
    let db = db(vec![
        ("203.0.113.0/26", out_of_range),
        ("203.0.113.64/26", names_only),
        ("203.0.113.128/26", unknown_code),
        // keeps the schema check happy: one usable record
        ("192.0.2.0/24", city(1.0, 2.0, "DE")),
    ]);
    let it = db
        .lookup(ip("203.0.113.1"))
        .expect("falls back to the country");
    assert_eq!(
        (it.country.as_deref(), it.precision),
        (Some("IT"), Precision::CountryCentroid)
    );
    assert_eq!(db.try_lookup(ip("203.0.113.65")).expect("decodes"), None);
    assert_eq!(db.try_lookup(ip("203.0.113.129")).expect("decodes"), None);
}

#[test]
fn ipv6_in_an_ipv4_database_is_none() {
    let bytes = mmdb(
        "Test-V4",
        IpVersion::V4,
        vec![("192.0.2.0/24", city(10.0, 20.0, "DE"))],
    );
    let db = GeoDb::from_bytes(bytes, "v4.mmdb").expect("opens");
    assert!(db.lookup(ip("192.0.2.9")).is_some());
    assert_eq!(
        db.try_lookup(ip("2001:db8::1")).expect("not an error"),
        None
    );
    assert!(db.lookup(ip("::ffff:192.0.2.9")).is_some());
}

// ---- opening errors ----

#[test]
fn an_asn_database_is_rejected_at_open() {
    let asn = Value::map([
        ("autonomous_system_number", Value::from(64_512_u32)),
        ("autonomous_system_organization", Value::from("Example")),
    ]);
    let bytes = mmdb("GeoLite2-ASN", IpVersion::V6, vec![("192.0.2.0/24", asn)]);
    match GeoDb::from_bytes(bytes, "/etc/asn.mmdb") {
        Err(e @ GeoDbError::UnsupportedSchema { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("/etc/asn.mmdb") && msg.contains("GeoLite2-ASN"),
                "{msg}"
            );
        }
        other => panic!("expected UnsupportedSchema, got {other:?}"),
    }
}

#[test]
fn unreadable_and_corrupt_files_name_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.mmdb");
    match GeoDb::open(&missing) {
        Err(e @ GeoDbError::Io { .. }) => assert!(e.to_string().contains("nope.mmdb"), "{e}"),
        other => panic!("expected Io, got {other:?}"),
    }
    let garbage = dir.path().join("garbage.mmdb");
    std::fs::write(&garbage, b"this is not a maxmind database").expect("write");
    match GeoDb::open(&garbage) {
        Err(e @ GeoDbError::Invalid { .. }) => {
            assert!(e.to_string().contains("garbage.mmdb"), "{e}")
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    // A truncated real database must not panic either.
    let bytes = std::fs::read(bundled()).expect("read bundled");
    let truncated = dir.path().join("truncated.mmdb");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    assert!(GeoDb::open(&truncated).is_err());
}

// ---- reloading ----

/// Writes a one-network database whose record says `country`, atomically (temp + rename),
/// the way an updater replaces the file.
fn write_db(path: &Path, country: &str) {
    let bytes = mmdb(
        "Test-Country",
        IpVersion::V6,
        vec![(
            "192.0.2.0/24",
            Value::map([("country_code", Value::from(country))]),
        )],
    );
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename");
}

fn country_of(db: &ReloadingGeoDb) -> Option<String> {
    db.lookup(ip("192.0.2.1")).and_then(|l| l.country)
}

#[test]
fn reload_picks_up_a_replaced_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("geo.mmdb");
    write_db(&path, "DE");
    let db = ReloadingGeoDb::open(&path, Duration::ZERO).expect("opens");
    assert_eq!(country_of(&db).as_deref(), Some("DE"));
    assert_eq!(db.maybe_reload().expect("check"), ReloadOutcome::Unchanged);

    write_db(&path, "JP");
    assert_eq!(db.maybe_reload().expect("check"), ReloadOutcome::Reloaded);
    assert_eq!(country_of(&db).as_deref(), Some("JP"));
    assert_eq!(db.generation(), 2);
    assert_eq!(db.maybe_reload().expect("check"), ReloadOutcome::Unchanged);
}

#[test]
fn a_bad_replacement_keeps_the_old_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("geo.mmdb");
    write_db(&path, "DE");
    let db = ReloadingGeoDb::open(&path, Duration::ZERO).expect("opens");
    std::fs::write(&path, b"half a file").expect("overwrite");
    let err = db.reload_if_changed().expect_err("garbage must not load");
    assert!(err.to_string().contains("geo.mmdb"), "{err}");
    assert_eq!(country_of(&db).as_deref(), Some("DE"));
    assert_eq!(db.generation(), 1);
    // Once the file is fixed the next check loads it.
    write_db(&path, "FR");
    assert_eq!(
        db.reload_if_changed().expect("check"),
        ReloadOutcome::Reloaded
    );
    assert_eq!(country_of(&db).as_deref(), Some("FR"));
}

#[test]
fn checks_are_rate_limited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("geo.mmdb");
    write_db(&path, "DE");
    let db = ReloadingGeoDb::open(&path, Duration::from_secs(3600)).expect("opens");
    write_db(&path, "JP");
    assert_eq!(db.maybe_reload().expect("check"), ReloadOutcome::NotDue);
    assert_eq!(country_of(&db).as_deref(), Some("DE"));
    // An explicit reload (SIGHUP) ignores the interval.
    assert_eq!(
        db.reload_if_changed().expect("check"),
        ReloadOutcome::Reloaded
    );
    assert_eq!(country_of(&db).as_deref(), Some("JP"));
}

#[test]
fn watcher_reloads_in_the_background_and_stops_on_drop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("geo.mmdb");
    write_db(&path, "DE");
    let db = Arc::new(ReloadingGeoDb::open(&path, Duration::from_millis(20)).expect("opens"));
    let watcher = db.spawn_watcher().expect("spawn");
    write_db(&path, "JP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while country_of(&db).as_deref() != Some("JP") {
        assert!(Instant::now() < deadline, "watcher did not reload");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(watcher);
    write_db(&path, "FR");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        country_of(&db).as_deref(),
        Some("JP"),
        "stopped watcher reloaded"
    );
}

#[test]
fn readers_never_miss_during_reloads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("geo.mmdb");
    write_db(&path, "DE");
    let db = Arc::new(ReloadingGeoDb::open(&path, Duration::ZERO).expect("opens"));
    let stop = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (db, stop, lookups) = (db.clone(), stop.clone(), lookups.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let c = country_of(&db);
                    assert!(matches!(c.as_deref(), Some("DE" | "JP")), "saw {c:?}");
                    lookups.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for i in 0..20 {
        write_db(&path, if i % 2 == 0 { "JP" } else { "DE" });
        assert_eq!(
            db.reload_if_changed().expect("reload"),
            ReloadOutcome::Reloaded
        );
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("reader panicked");
    }
    assert_eq!(db.generation(), 21);
    assert!(lookups.load(Ordering::Relaxed) > 0);
}
