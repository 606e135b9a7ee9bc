//! Regions, great-circle distances, and the nearest-first failover order.

use serde::{Deserialize, Serialize};

use crate::lookup::Location;

/// Mean Earth radius (IUGG), in kilometres.
pub const EARTH_RADIUS_KM: f64 = 6371.0088;

/// A place where gateways and CVMs run, e.g. `eu-west` at Dublin's coordinates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// The region's name, as backends and nodes refer to it.
    pub name: String,
    /// Latitude in degrees, −90 to 90.
    pub lat: f64,
    /// Longitude in degrees, −180 to 180.
    pub lon: f64,
}

/// A region whose definition cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegionError {
    /// The name is empty.
    #[error("region name must not be empty")]
    EmptyName,
    /// The latitude is outside −90..=90 or not a number.
    #[error("region {name:?}: latitude {lat} is outside -90..=90")]
    Latitude {
        /// The region.
        name: String,
        /// The rejected value.
        lat: f64,
    },
    /// The longitude is outside −180..=180 or not a number.
    #[error("region {name:?}: longitude {lon} is outside -180..=180")]
    Longitude {
        /// The region.
        name: String,
        /// The rejected value.
        lon: f64,
    },
    /// Two regions have the same name.
    #[error("region {0:?} is defined twice")]
    Duplicate(String),
}

impl Region {
    /// A validated region.
    pub fn new(name: impl Into<String>, lat: f64, lon: f64) -> Result<Region, RegionError> {
        let region = Region {
            name: name.into(),
            lat,
            lon,
        };
        region.validate()?;
        Ok(region)
    }

    /// Checks the name and coordinate ranges (for regions deserialized from config).
    pub fn validate(&self) -> Result<(), RegionError> {
        if self.name.is_empty() {
            return Err(RegionError::EmptyName);
        }
        // `contains` is false for NaN, so NaN is rejected too.
        if !(-90.0..=90.0).contains(&self.lat) {
            return Err(RegionError::Latitude {
                name: self.name.clone(),
                lat: self.lat,
            });
        }
        if !(-180.0..=180.0).contains(&self.lon) {
            return Err(RegionError::Longitude {
                name: self.name.clone(),
                lon: self.lon,
            });
        }
        Ok(())
    }

    /// Great-circle distance from this region to a point, in kilometres.
    pub fn distance_km(&self, lat: f64, lon: f64) -> f64 {
        haversine_km(self.lat, self.lon, lat, lon)
    }
}

/// Validates every region and that names are unique.
pub fn validate_regions(regions: &[Region]) -> Result<(), RegionError> {
    let mut names = std::collections::BTreeSet::new();
    for region in regions {
        region.validate()?;
        if !names.insert(region.name.as_str()) {
            return Err(RegionError::Duplicate(region.name.clone()));
        }
    }
    Ok(())
}

/// Great-circle distance between two points given in degrees, in kilometres, on a sphere of
/// [`EARTH_RADIUS_KM`] (within ~0.5 % of the ellipsoidal distance).
pub fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (phi1, phi2) = (lat1.to_radians(), lat2.to_radians());
    let dphi = (lat2 - lat1).to_radians();
    let dlambda = (lon2 - lon1).to_radians();
    let a = (dphi / 2.0).sin().powi(2) + phi1.cos() * phi2.cos() * (dlambda / 2.0).sin().powi(2);
    // Rounding can push `a` a hair past 1 for antipodal points; asin would return NaN.
    2.0 * EARTH_RADIUS_KM * a.clamp(0.0, 1.0).sqrt().asin()
}

/// The healthy regions, nearest to `location` first: the order to try them in, and so the
/// failover order. Regions for which `healthy(name)` is false are left out. Equal distances
/// are ordered by name, so every node produces the same order.
pub fn rank_regions<'a>(
    location: &Location,
    regions: &'a [Region],
    healthy: impl Fn(&str) -> bool,
) -> Vec<&'a Region> {
    rank_indices(location.lat, location.lon, regions, |r| healthy(&r.name))
        .into_iter()
        .filter_map(|i| regions.get(i))
        .collect()
}

/// Indices into `regions` of the regions passing `keep`, nearest to `(lat, lon)` first.
pub(crate) fn rank_indices(
    lat: f64,
    lon: f64,
    regions: &[Region],
    keep: impl Fn(&Region) -> bool,
) -> Vec<usize> {
    let points: Vec<UnitVector> = regions
        .iter()
        .map(|r| UnitVector::new(r.lat, r.lon))
        .collect();
    rank_by_vector(UnitVector::new(lat, lon), &points, regions, |i| {
        regions.get(i).is_some_and(&keep)
    })
}

/// A point on the unit sphere. The dot product of two is the cosine of the angle between
/// them, which orders points by great-circle distance with two trigonometric calls per
/// client instead of four per region.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct UnitVector([f64; 3]);

impl UnitVector {
    pub(crate) fn new(lat: f64, lon: f64) -> UnitVector {
        let (sin_lat, cos_lat) = lat.to_radians().sin_cos();
        let (sin_lon, cos_lon) = lon.to_radians().sin_cos();
        UnitVector([cos_lat * cos_lon, cos_lat * sin_lon, sin_lat])
    }

    fn dot(&self, other: &UnitVector) -> f64 {
        self.0[0] * other.0[0] + self.0[1] * other.0[1] + self.0[2] * other.0[2]
    }
}

/// Indices of `points` (positions of `regions`) passing `keep`, nearest to `from` first;
/// equal distances by region name, so that every node ranks alike.
pub(crate) fn rank_by_vector(
    from: UnitVector,
    points: &[UnitVector],
    regions: &[Region],
    keep: impl Fn(usize) -> bool,
) -> Vec<usize> {
    let mut ranked: Vec<(f64, usize)> = points
        .iter()
        .enumerate()
        .filter(|&(i, _)| keep(i))
        .map(|(i, p)| (from.dot(p), i))
        .collect();
    // Larger cosine = smaller angle = nearer.
    ranked.sort_by(|(ca, ia), (cb, ib)| {
        cb.total_cmp(ca).then_with(|| {
            let name = |i: &usize| regions.get(*i).map(|r| r.name.as_str());
            name(ia).cmp(&name(ib))
        })
    });
    ranked.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests;
