//! Backend selection and geo lookup costs, and Maglev key movement.
//!
//! Run: `cargo bench -p portcullis-geo --bench select`
//! (a plain binary with `harness = false`; not a timed test). Each figure is the per-operation
//! time of batches of operations, summarised over many batches with hdrhistogram.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use portcullis_geo::select::{Maglev, MaglevConfig};
use portcullis_geo::{
    Backend, BackendSelection, GeoDb, LbPolicy, Location, Region, ReloadingGeoDb, SelectConfig,
    SelectInput, Selector,
};

/// Operations per timed batch: large enough that `Instant::now` (~20 ns) is noise.
const BATCH: usize = 1_000;
/// How long each measurement runs.
const RUN: Duration = Duration::from_millis(400);

/// A deterministic generator, so every run sees the same addresses.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 16
    }
}

struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
}

/// Times `op(i)` in batches for [`RUN`]; returns ns/op percentiles over batches.
fn measure(mut op: impl FnMut(usize)) -> Stats {
    // Tenths of a nanosecond per op, up to 1 ms.
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).expect("valid bounds");
    let mut i = 0usize;
    for _ in 0..BATCH {
        op(i);
        i += 1;
    }
    let start = Instant::now();
    while start.elapsed() < RUN {
        let t = Instant::now();
        for _ in 0..BATCH {
            op(i);
            i = i.wrapping_add(1);
        }
        let per_op = t.elapsed().as_nanos() as f64 / BATCH as f64;
        hist.saturating_record((per_op * 10.0).round().max(1.0) as u64);
    }
    Stats {
        p50: hist.value_at_quantile(0.5) as f64 / 10.0,
        p99: hist.value_at_quantile(0.99) as f64 / 10.0,
        mean: hist.mean() / 10.0,
    }
}

fn regions() -> Vec<Region> {
    [
        ("us-east", 38.95, -77.45),
        ("us-west", 45.6, -121.2),
        ("eu-west", 53.35, -6.26),
        ("eu-central", 50.11, 8.68),
        ("ap-south", 19.08, 72.88),
        ("ap-northeast", 35.68, 139.65),
    ]
    .into_iter()
    .map(|(n, lat, lon)| Region::new(n, lat, lon).expect("valid region"))
    .collect()
}

fn backends(n: usize, regions: &[Region]) -> Vec<Backend> {
    (0..n)
        .map(|i| {
            Backend::new(
                format!("cvm-{i:05}"),
                regions[i % regions.len()].name.clone(),
            )
        })
        .collect()
}

fn client_ips(count: usize) -> Vec<IpAddr> {
    let mut rng = Lcg(7);
    (0..count)
        .map(|_| IpAddr::V4(Ipv4Addr::from(rng.next() as u32)))
        .collect()
}

fn selection() {
    println!("## backend selection (first choice), ns/op");
    println!(
        "{:<26} {:>9} {:>10} {:>10} {:>10}",
        "policy", "backends", "p50", "p99", "mean"
    );
    let regions = regions();
    let ips = client_ips(4096);
    let locations: Vec<Location> = (0..64)
        .map(|i| {
            Location::at(-60.0 + (i as f64) * 2.0, -180.0 + (i as f64) * 5.6).expect("in range")
        })
        .collect();
    let config = SelectConfig::default();
    for policy in [
        "round-robin",
        "least-conn",
        "hash:ip",
        "hash:ip (under load)",
        "geo",
        "geo+hash:ip",
    ] {
        for n in [10, 100, 1_000] {
            let loaded = policy.ends_with("(under load)");
            let parsed: LbPolicy = policy
                .trim_end_matches(" (under load)")
                .parse()
                .expect("valid policy");
            let sel =
                Selector::build(&parsed, backends(n, &regions), &regions, &config).expect("build");
            // Bounded load's slow path: every backend busy, so the total is summed per pick.
            let _held: Vec<_> = if loaded {
                sel.backends()
                    .iter()
                    .flat_map(|b| (0..3).map(|_| b.load.acquire()).collect::<Vec<_>>())
                    .collect()
            } else {
                Vec::new()
            };
            let geo = parsed.to_string().starts_with("geo");
            let s = measure(|i| {
                let loc = geo.then(|| &locations[i % locations.len()]);
                let input = SelectInput::new(ips[i % ips.len()]).with_location(loc);
                black_box(sel.iter(black_box(&input)).next());
            });
            println!(
                "{:<26} {:>9} {:>10.1} {:>10.1} {:>10.1}",
                policy, n, s.p50, s.p99, s.mean
            );
        }
    }
    println!();
}

fn failover() {
    println!("## failover: time to walk to the 2nd and 5th choice, ns/op (100 backends)");
    let regions = regions();
    let ips = client_ips(4096);
    for policy in ["round-robin", "least-conn", "hash:ip", "geo+hash:ip"] {
        let parsed: LbPolicy = policy.parse().expect("valid policy");
        let sel = Selector::build(
            &parsed,
            backends(100, &regions),
            &regions,
            &SelectConfig::default(),
        )
        .expect("build");
        let loc = Location::at(48.0, 11.0).expect("in range");
        let mut out = Vec::new();
        for depth in [2, 5] {
            let s = measure(|i| {
                let input = SelectInput::new(ips[i % ips.len()]).with_location(Some(&loc));
                black_box(sel.iter(&input).nth(depth - 1));
            });
            out.push(format!("choice {depth}: p50 {:.1}", s.p50));
        }
        println!("{:<26} {}", policy, out.join(", "));
    }
    println!();
}

fn build_time() {
    println!("## Maglev table build (65,537 slots), ms");
    let regions = regions();
    for n in [10, 100, 1_000] {
        let bs = backends(n, &regions);
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            black_box(Maglev::build(bs.clone(), &MaglevConfig::default()).expect("build"));
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!("{n:>5} backends: median {:.2} ms", times[2]);
    }
    println!();
}

fn movement() {
    println!("## Maglev key movement when one backend is removed (or added)");
    println!(
        "{:>9} {:>12} {:>12} {:>12} {:>12}",
        "backends", "ideal 1/N", "removed", "added", "sampled keys"
    );
    let regions = regions();
    let mut rng = Lcg(99);
    let keys: Vec<u64> = (0..200_000).map(|_| rng.next()).collect();
    for n in [10, 100, 1_000] {
        let all = backends(n, &regions);
        let full = Maglev::build(all.clone(), &MaglevConfig::default()).expect("build");
        let mut fewer = all.clone();
        fewer.remove(n / 2);
        let less = Maglev::build(fewer, &MaglevConfig::default()).expect("build");
        let mut more = all;
        more.push(Backend::new("cvm-new", "us-east"));
        let grown = Maglev::build(more, &MaglevConfig::default()).expect("build");
        let diff = |a: &Maglev, b: &Maglev| {
            let changed = a
                .table_ids()
                .zip(b.table_ids())
                .filter(|(x, y)| x != y)
                .count();
            changed as f64 / a.table_size() as f64
        };
        let sampled = keys
            .iter()
            .filter(|&&k| {
                full.iter_hash(k).next().map(|b| &b.id) != less.iter_hash(k).next().map(|b| &b.id)
            })
            .count() as f64
            / keys.len() as f64;
        println!(
            "{:>9} {:>11.4}% {:>11.4}% {:>11.4}% {:>11.4}%",
            n,
            100.0 / n as f64,
            100.0 * diff(&full, &less),
            100.0 * diff(&full, &grown),
            100.0 * sampled
        );
    }
    println!();
}

/// Well-known addresses plus a fixed pseudo-random sample of the IPv4 and IPv6 space.
fn lookup_addresses() -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = [
        "8.8.8.8",
        "1.1.1.1",
        "193.99.144.80",
        "203.178.141.194",
        "81.2.69.142",
        "2a01:4f8::1",
        "2001:200::1",
        "2001:41d0::1",
    ]
    .iter()
    .map(|s| s.parse().expect("address"))
    .collect();
    let mut rng = Lcg(1234);
    for _ in 0..8_000 {
        v.push(IpAddr::V4(Ipv4Addr::from(rng.next() as u32)));
    }
    for _ in 0..2_000 {
        // Inside 2000::/3, where allocations are.
        let hi = 0x2000_0000_0000_0000u64 | (rng.next() << 20 & 0x1fff_ffff_ffff_ffff);
        v.push(IpAddr::V6(Ipv6Addr::from(
            (u128::from(hi) << 64) | u128::from(rng.next()),
        )));
    }
    v
}

fn geo_lookup() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/dbip-country.mmdb");
    println!(
        "## geo lookup on {} (DB-IP Lite country), ns/op",
        path.display()
    );
    let t = Instant::now();
    let db = GeoDb::open(&path).expect("bundled database");
    println!("open + validate: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let addrs = lookup_addresses();
    let found = addrs.iter().filter(|&&a| db.lookup(a).is_some()).count();
    println!("{} addresses, {} located", addrs.len(), found);
    let s = measure(|i| {
        black_box(db.lookup(black_box(addrs[i % addrs.len()])));
    });
    println!(
        "{:<34} p50 {:>7.1}  p99 {:>7.1}  mean {:>7.1}",
        "GeoDb::lookup", s.p50, s.p99, s.mean
    );
    let reloading = ReloadingGeoDb::open(&path, Duration::from_secs(60)).expect("bundled database");
    let s = measure(|i| {
        black_box(reloading.lookup(black_box(addrs[i % addrs.len()])));
    });
    println!(
        "{:<34} p50 {:>7.1}  p99 {:>7.1}  mean {:>7.1}",
        "ReloadingGeoDb::lookup", s.p50, s.p99, s.mean
    );
    // The same work done directly with maxminddb, as the floor this crate adds to.
    let raw = maxminddb::Reader::open_readfile(&path).expect("bundled database");
    let s = measure(|i| {
        let ip = addrs[i % addrs.len()];
        let code: Option<String> = raw
            .lookup(black_box(ip))
            .ok()
            .and_then(|r| {
                r.decode_path(&[maxminddb::PathElement::Key("country_code")])
                    .ok()
            })
            .flatten();
        black_box(code);
    });
    println!(
        "{:<34} p50 {:>7.1}  p99 {:>7.1}  mean {:>7.1}",
        "raw maxminddb decode_path", s.p50, s.p99, s.mean
    );
    match time_libmaxminddb(&path, &addrs) {
        Ok(s) => println!(
            "{:<34} p50 {:>7.1}  p99 {:>7.1}  mean {:>7.1}",
            "libmaxminddb (C) get_value", s.p50, s.p99, s.mean
        ),
        Err(why) => println!("libmaxminddb timing skipped: {why}"),
    }
    println!();
    compare_with_mmdblookup(&path, &db, &addrs);
}

/// Times libmaxminddb itself on the same addresses and field: compiles
/// `benches/libmaxminddb_lookup.c` (Debian `libmaxminddb-dev`) and feeds its per-batch figures
/// into the same histogram scheme as [`measure`].
fn time_libmaxminddb(path: &Path, addrs: &[IpAddr]) -> Result<Stats, String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/libmaxminddb_lookup.c");
    let exe = dir.join("libmaxminddb_lookup");
    let cc = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&exe)
        .arg(&src)
        .arg("-lmaxminddb")
        .output()
        .map_err(|e| format!("no C compiler: {e}"))?;
    if !cc.status.success() {
        return Err(format!(
            "cc failed (apt-get install libmaxminddb-dev): {}",
            String::from_utf8_lossy(&cc.stderr).trim()
        ));
    }
    let list = dir.join("lookup-addresses.txt");
    let text: String = addrs.iter().map(|a| format!("{a}\n")).collect();
    std::fs::write(&list, text).map_err(|e| e.to_string())?;
    let out = Command::new(&exe)
        .arg(path)
        .arg(&list)
        .arg(BATCH.to_string())
        .arg(RUN.as_millis().to_string())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).expect("valid bounds");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let per_op: f64 = line
            .trim()
            .parse()
            .map_err(|_| format!("bad line {line:?}"))?;
        hist.saturating_record((per_op * 10.0).round().max(1.0) as u64);
    }
    if hist.is_empty() {
        return Err("no batches reported".into());
    }
    Ok(Stats {
        p50: hist.value_at_quantile(0.5) as f64 / 10.0,
        p99: hist.value_at_quantile(0.99) as f64 / 10.0,
        mean: hist.mean() / 10.0,
    })
}

/// Cross-checks countries against libmaxminddb's `mmdblookup` (Debian `mmdb-bin`) if present.
fn compare_with_mmdblookup(path: &Path, db: &GeoDb, addrs: &[IpAddr]) {
    let probe = Command::new("mmdblookup").arg("--version").output();
    if probe.is_err() {
        println!("## mmdblookup not installed (apt-get install mmdb-bin); skipping cross-check\n");
        return;
    }
    let sample: Vec<IpAddr> = addrs.iter().step_by(50).copied().collect();
    let mut agree = 0;
    let mut disagree = Vec::new();
    for ip in &sample {
        let out = Command::new("mmdblookup")
            .arg("--file")
            .arg(path)
            .arg("--ip")
            .arg(ip.to_string())
            .arg("country_code")
            .output();
        let theirs = out.ok().and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.split('"').nth(1).map(str::to_owned)
        });
        let ours = db.lookup(*ip).and_then(|l| l.country);
        if theirs == ours {
            agree += 1;
        } else {
            disagree.push(format!("{ip}: ours {ours:?}, mmdblookup {theirs:?}"));
        }
    }
    println!(
        "## mmdblookup cross-check: {agree}/{} addresses agree",
        sample.len()
    );
    for d in disagree.iter().take(10) {
        println!("  {d}");
    }
    println!();
}

fn main() {
    println!(
        "portcullis-geo bench ({} build)\n",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    selection();
    failover();
    build_time();
    movement();
    geo_lookup();
}
