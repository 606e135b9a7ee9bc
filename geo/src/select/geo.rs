//! Geographic selection: the nearest region that has backends first, then the next nearest;
//! inside a region, the app's own method.

use std::collections::BTreeMap;

use super::{
    prepare, Backend, BackendSelection, LocalIter, LocalSelector, RegionMethod, SelectConfig,
    SelectError, SelectInput,
};
use crate::region::{rank_by_vector, Region, UnitVector};

/// What a [`GeoSelector`] is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct GeoSelectorConfig {
    /// The method inside each region.
    pub method: RegionMethod,
    /// The cluster's regions with their coordinates.
    pub regions: Vec<Region>,
    /// Node-wide selection settings (hash table size, home region).
    pub select: SelectConfig,
}

/// Nearest region first. Regions are ranked from the client's location; when that is
/// unknown, from the home region if one is configured, else in configured order. Backends
/// whose region is not configured come last, grouped by region name.
///
/// Unhealthy regions are skipped by the caller's health check rejecting their backends: the
/// iterator then moves on to the next region, which is the failover order.
#[derive(Debug)]
pub struct GeoSelector {
    all: Vec<Backend>,
    /// `groups[..located.len()]` belong to `located[..]`; the rest are unknown regions.
    groups: Vec<LocalSelector>,
    located: Vec<Region>,
    /// `located` as unit vectors, so ranking costs no trigonometry per region.
    points: Vec<UnitVector>,
    home: Option<UnitVector>,
    hashes: bool,
}

impl BackendSelection for GeoSelector {
    type Config = GeoSelectorConfig;
    type Iter<'a> = GeoIter<'a>;

    fn build(backends: Vec<Backend>, config: &GeoSelectorConfig) -> Result<Self, SelectError> {
        config.select.validate(&config.regions)?;
        let all = prepare(backends)?;
        let mut by_region: BTreeMap<&str, Vec<Backend>> = BTreeMap::new();
        for b in &all {
            by_region.entry(&b.region).or_default().push(b.clone());
        }
        let mut groups = Vec::new();
        let mut located = Vec::new();
        for region in &config.regions {
            if let Some(members) = by_region.remove(region.name.as_str()) {
                groups.push(LocalSelector::build(
                    &config.method,
                    members,
                    &config.select,
                )?);
                located.push(region.clone());
            }
        }
        for (_, members) in by_region {
            groups.push(LocalSelector::build(
                &config.method,
                members,
                &config.select,
            )?);
        }
        let home = config.select.home_region.as_ref().and_then(|name| {
            config
                .regions
                .iter()
                .find(|r| &r.name == name)
                .map(|r| UnitVector::new(r.lat, r.lon))
        });
        Ok(GeoSelector {
            points: located
                .iter()
                .map(|r| UnitVector::new(r.lat, r.lon))
                .collect(),
            all,
            groups,
            located,
            home,
            hashes: matches!(config.method, RegionMethod::Hash(_)),
        })
    }

    fn iter<'a>(&'a self, input: &SelectInput<'_>) -> GeoIter<'a> {
        let origin = input
            .location
            .map(|l| UnitVector::new(l.lat, l.lon))
            .or(self.home);
        let mut order = match origin {
            Some(from) => rank_by_vector(from, &self.points, &self.located, |_| true),
            None => (0..self.located.len()).collect(),
        };
        order.extend(self.located.len()..self.groups.len());
        GeoIter {
            sel: self,
            order,
            pos: 0,
            current: None,
            key_hash: if self.hashes { input.key_hash() } else { 0 },
        }
    }

    fn backends(&self) -> &[Backend] {
        &self.all
    }
}

impl GeoSelector {
    /// The regions that have backends, in configured order.
    pub fn regions(&self) -> &[Region] {
        &self.located
    }
}

/// Iterator of [`GeoSelector`]: every backend of the nearest region (in the region method's
/// order), then of the next region, and so on.
#[derive(Debug)]
pub struct GeoIter<'a> {
    sel: &'a GeoSelector,
    order: Vec<usize>,
    pos: usize,
    current: Option<LocalIter<'a>>,
    key_hash: u64,
}

impl<'a> Iterator for GeoIter<'a> {
    type Item = &'a Backend;

    fn next(&mut self) -> Option<&'a Backend> {
        loop {
            if let Some(b) = self.current.as_mut().and_then(Iterator::next) {
                return Some(b);
            }
            let &group = self.order.get(self.pos)?;
            self.pos += 1;
            self.current = self
                .sel
                .groups
                .get(group)
                .map(|g| g.iter_hashed(self.key_hash));
        }
    }
}
