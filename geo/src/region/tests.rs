use proptest::prelude::*;

use super::*;
use crate::lookup::Precision;

const LONDON: (f64, f64) = (51.5074, -0.1278);
const PARIS: (f64, f64) = (48.8566, 2.3522);
const NEW_YORK: (f64, f64) = (40.7128, -74.0060);
const TOKYO: (f64, f64) = (35.6762, 139.6503);
const SYDNEY: (f64, f64) = (-33.8688, 151.2093);
const SAN_FRANCISCO: (f64, f64) = (37.7749, -122.4194);

fn dist(a: (f64, f64), b: (f64, f64)) -> f64 {
    haversine_km(a.0, a.1, b.0, b.1)
}

fn assert_close(got: f64, want: f64, tolerance: f64, what: &str) {
    assert!(
        (got - want).abs() <= want * tolerance,
        "{what}: {got:.1} km, expected {want:.1} km ± {:.0} %",
        tolerance * 100.0
    );
}

#[test]
fn haversine_matches_known_city_distances() {
    // Published great-circle distances, within 1 %.
    assert_close(dist(LONDON, PARIS), 343.5, 0.01, "London–Paris");
    assert_close(dist(NEW_YORK, LONDON), 5570.0, 0.01, "New York–London");
    assert_close(dist(TOKYO, SYDNEY), 7826.0, 0.01, "Tokyo–Sydney");
    assert_close(
        dist(SAN_FRANCISCO, NEW_YORK),
        4130.0,
        0.01,
        "San Francisco–New York",
    );
}

#[test]
fn haversine_edge_cases() {
    assert_eq!(dist(LONDON, LONDON), 0.0);
    let half_circumference = std::f64::consts::PI * EARTH_RADIUS_KM;
    assert_close(
        dist((0.0, 0.0), (0.0, 180.0)),
        half_circumference,
        1e-9,
        "antipodes",
    );
    assert_close(
        dist((90.0, 0.0), (-90.0, 0.0)),
        half_circumference,
        1e-9,
        "poles",
    );
    // Across the antimeridian is short, not the long way round.
    assert!(dist((0.0, 179.5), (0.0, -179.5)) < 112.0);
    // Longitude does not matter at the pole.
    assert!(dist((90.0, 0.0), (90.0, 123.0)) < 1e-6);
}

fn point() -> impl Strategy<Value = (f64, f64)> {
    (-90.0..=90.0f64, -180.0..=180.0f64)
}

proptest! {
    #[test]
    fn haversine_is_a_metric((a, b, c) in (point(), point(), point())) {
        let (ab, ba) = (dist(a, b), dist(b, a));
        prop_assert!((0.0..=std::f64::consts::PI * EARTH_RADIUS_KM + 1e-6).contains(&ab));
        prop_assert!((ab - ba).abs() < 1e-6);
        prop_assert!(dist(a, c) <= ab + dist(b, c) + 1e-6);
    }
}

fn regions() -> Vec<Region> {
    vec![
        Region::new("us-east", 38.95, -77.45).expect("valid"), // Virginia
        Region::new("eu-west", 53.35, -6.26).expect("valid"),  // Dublin
        Region::new("ap-south", 19.08, 72.88).expect("valid"), // Mumbai
        Region::new("ap-northeast", 35.68, 139.65).expect("valid"), // Tokyo
    ]
}

fn at(lat: f64, lon: f64) -> Location {
    Location {
        lat,
        lon,
        country: None,
        precision: Precision::Coordinates,
    }
}

fn names(ranked: &[&Region]) -> Vec<String> {
    ranked.iter().map(|r| r.name.clone()).collect()
}

#[test]
fn ranks_nearest_first() {
    let regions = regions();
    let berlin = at(52.52, 13.405);
    assert_eq!(
        names(&rank_regions(&berlin, &regions, |_| true)),
        ["eu-west", "ap-south", "us-east", "ap-northeast"]
    );
    let seoul = at(37.57, 126.98);
    assert_eq!(
        names(&rank_regions(&seoul, &regions, |_| true))[0],
        "ap-northeast"
    );
    let chicago = at(41.88, -87.63);
    assert_eq!(
        names(&rank_regions(&chicago, &regions, |_| true)),
        ["us-east", "eu-west", "ap-northeast", "ap-south"]
    );
}

#[test]
fn unhealthy_regions_are_skipped_and_the_next_nearest_takes_over() {
    let regions = regions();
    let berlin = at(52.52, 13.405);
    let ranked = rank_regions(&berlin, &regions, |name| name != "eu-west");
    assert_eq!(names(&ranked), ["ap-south", "us-east", "ap-northeast"]);
    assert!(rank_regions(&berlin, &regions, |_| false).is_empty());
}

#[test]
fn equal_distances_are_ordered_by_name() {
    let regions = vec![
        Region::new("b", 0.0, 10.0).expect("valid"),
        Region::new("a", 0.0, -10.0).expect("valid"),
        Region::new("c", 0.0, 50.0).expect("valid"),
    ];
    assert_eq!(
        names(&rank_regions(&at(0.0, 0.0), &regions, |_| true)),
        ["a", "b", "c"]
    );
}

proptest! {
    /// Ranking is sorted by distance and keeps exactly the healthy regions.
    #[test]
    fn ranking_is_sorted_and_complete(
        (lat, lon) in point(),
        pts in prop::collection::vec(point(), 0..12),
        healthy_mask in any::<u16>(),
    ) {
        let regions: Vec<Region> = pts
            .iter()
            .enumerate()
            .map(|(i, &(la, lo))| Region::new(format!("r{i}"), la, lo).expect("in range"))
            .collect();
        let healthy = |name: &str| {
            let i: u32 = name[1..].parse().unwrap_or(0);
            healthy_mask & (1 << i) != 0
        };
        let ranked = rank_regions(&at(lat, lon), &regions, healthy);
        let want = regions.iter().filter(|r| healthy(&r.name)).count();
        prop_assert_eq!(ranked.len(), want);
        for pair in ranked.windows(2) {
            prop_assert!(pair[0].distance_km(lat, lon) <= pair[1].distance_km(lat, lon));
        }
    }
}

#[test]
fn invalid_regions_are_rejected_with_the_value() {
    assert_eq!(Region::new("", 0.0, 0.0), Err(RegionError::EmptyName));
    let e = Region::new("moon", 91.0, 0.0).expect_err("latitude");
    assert!(
        e.to_string().contains("91") && e.to_string().contains("moon"),
        "{e}"
    );
    let e = Region::new("x", 0.0, -180.5).expect_err("longitude");
    assert!(e.to_string().contains("-180.5"), "{e}");
    assert!(Region::new("nan", f64::NAN, 0.0).is_err());
    let dup = vec![
        Region::new("a", 0.0, 0.0).expect("valid"),
        Region::new("a", 1.0, 1.0).expect("valid"),
    ];
    assert_eq!(
        validate_regions(&dup),
        Err(RegionError::Duplicate("a".into()))
    );
    assert_eq!(validate_regions(&regions()), Ok(()));
}
