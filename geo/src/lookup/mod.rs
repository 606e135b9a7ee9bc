//! Client address → approximate location, from a MaxMind-format (MMDB) database.
//!
//! [`GeoDb`] reads the GeoIP2/GeoLite2 City schema (`location.latitude/longitude`) and the
//! flat country schemas (`country.iso_code`, `country_code`), turning a bare country into its
//! centroid. [`ReloadingGeoDb`] watches the file and swaps in a new copy when it changes,
//! without ever making a lookup wait.
//!
//! The file is read into memory (`Reader::open_readfile` semantics) rather than mapped:
//! mapping needs `unsafe` (the file must not change while mapped) and the workspace forbids
//! it. A country database is ~8 MiB, a City database ~70 MiB; a reload briefly holds two.

mod record;
mod reload;

use std::fs::File;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use maxminddb::{MaxMindDbError, Reader};

pub use reload::{ReloadOutcome, ReloadingGeoDb, Watcher};

use crate::centroids::centroid;
use record::{valid_coordinates, Record};

/// Where a client probably is.
#[derive(Debug, Clone, PartialEq)]
pub struct Location {
    /// Latitude in degrees, −90 to 90.
    pub lat: f64,
    /// Longitude in degrees, −180 to 180.
    pub lon: f64,
    /// ISO 3166-1 alpha-2 country code in upper case (`XK` for Kosovo), when known.
    pub country: Option<String>,
    /// Whether `lat`/`lon` came from the record or from the country's centroid.
    pub precision: Precision,
}

impl Location {
    /// A point with no country, e.g. a gateway's own position. `None` if the coordinates are
    /// out of range or not finite.
    pub fn at(lat: f64, lon: f64) -> Option<Location> {
        valid_coordinates(lat, lon).then_some(Location {
            lat,
            lon,
            country: None,
            precision: Precision::Coordinates,
        })
    }
}

/// How a [`Location`]'s coordinates were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// The record carried coordinates (City-level databases).
    Coordinates,
    /// The record carried only a country; the point is that country's approximate centre.
    CountryCentroid,
}

/// Errors opening or reading a geo database. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum GeoDbError {
    /// The file could not be opened, read or stat'ed.
    #[error("cannot read geo database {}: {source}", .path.display())]
    Io {
        /// The database path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid MaxMind DB.
    #[error("invalid geo database {}: {source}", .path.display())]
    Invalid {
        /// The database path.
        path: PathBuf,
        /// What the reader rejected.
        #[source]
        source: MaxMindDbError,
    },
    /// The database is valid MMDB but none of the sampled records has coordinates or a
    /// country code this crate knows, e.g. an ASN database.
    #[error(
        "geo database {} (type {database_type:?}) has no usable location: none of its first \
         {sampled} records has location.latitude/longitude, country.iso_code or country_code",
        .path.display()
    )]
    UnsupportedSchema {
        /// The database path.
        path: PathBuf,
        /// The `database_type` from the file's metadata.
        database_type: String,
        /// How many records were examined.
        sampled: usize,
    },
    /// The record for one address could not be decoded (a corrupt database).
    #[error("cannot decode the geo record for {ip} in {}: {source}", .path.display())]
    Decode {
        /// The address looked up.
        ip: IpAddr,
        /// The database path.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: MaxMindDbError,
    },
}

/// How many records [`GeoDb::open`] decodes to check that the schema is one it understands.
const SCHEMA_SAMPLE: usize = 1024;

/// An opened MaxMind-format database. Cheap to share behind an `Arc`; lookups take `&self`.
pub struct GeoDb {
    reader: Reader<Vec<u8>>,
    path: PathBuf,
}

impl std::fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoDb")
            .field("path", &self.path)
            .field("database_type", &self.database_type())
            .field("build_epoch", &self.build_epoch())
            .finish()
    }
}

impl GeoDb {
    /// Reads and validates the database at `path`.
    ///
    /// Fails if the file is unreadable, not MMDB, or has no records this crate can locate
    /// (so that a wrong file is caught at startup, not as silently unranked clients).
    pub fn open(path: impl AsRef<Path>) -> Result<GeoDb, GeoDbError> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(|source| io_error(path, source))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|source| io_error(path, source))?;
        GeoDb::from_bytes(bytes, path)
    }

    /// Parses a database already in memory; `path` is only used in messages.
    pub fn from_bytes(bytes: Vec<u8>, path: impl Into<PathBuf>) -> Result<GeoDb, GeoDbError> {
        let path = path.into();
        let reader = match Reader::from_source(bytes) {
            Ok(reader) => reader,
            Err(source) => return Err(GeoDbError::Invalid { path, source }),
        };
        let db = GeoDb { reader, path };
        db.check_schema()?;
        Ok(db)
    }

    /// Decodes the first records until one yields a location.
    fn check_schema(&self) -> Result<(), GeoDbError> {
        let networks =
            self.reader
                .networks(Default::default())
                .map_err(|source| GeoDbError::Invalid {
                    path: self.path.clone(),
                    source,
                })?;
        let mut sampled = 0;
        for item in networks.take(SCHEMA_SAMPLE) {
            sampled += 1;
            let item = item.map_err(|source| GeoDbError::Invalid {
                path: self.path.clone(),
                source,
            })?;
            // A record that fails to decode is a corrupt file, not an unknown schema.
            let record = item
                .decode::<Record>()
                .map_err(|source| GeoDbError::Invalid {
                    path: self.path.clone(),
                    source,
                })?;
            if record.is_some_and(|r| locate(&r).is_some()) {
                return Ok(());
            }
        }
        Err(GeoDbError::UnsupportedSchema {
            path: self.path.clone(),
            database_type: self.database_type().to_owned(),
            sampled,
        })
    }

    /// Where `ip` probably is; `None` when the database has no record for it (private and
    /// reserved ranges, unallocated space), the record has neither coordinates nor a known
    /// country, or the record is corrupt. IPv4-mapped IPv6 addresses are looked up as IPv4.
    pub fn lookup(&self, ip: IpAddr) -> Option<Location> {
        self.try_lookup(ip).ok().flatten()
    }

    /// Like [`GeoDb::lookup`], but reports a corrupt record instead of hiding it.
    ///
    /// An IPv6 address in an IPv4-only database is `Ok(None)`, not an error.
    pub fn try_lookup(&self, ip: IpAddr) -> Result<Option<Location>, GeoDbError> {
        let ip = ip.to_canonical();
        if ip.is_ipv6() && self.reader.metadata().ip_version == 4 {
            return Ok(None);
        }
        let decoded = self
            .reader
            .lookup(ip)
            .and_then(|result| result.decode::<Record>());
        match decoded {
            Ok(record) => Ok(record.as_ref().and_then(locate)),
            Err(source) => Err(GeoDbError::Decode {
                ip,
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// The `database_type` from the file's metadata, e.g. `GeoLite2-City`.
    pub fn database_type(&self) -> &str {
        &self.reader.metadata().database_type
    }

    /// When the database was built, in seconds since the Unix epoch.
    pub fn build_epoch(&self) -> u64 {
        self.reader.metadata().build_epoch
    }

    /// The file this database was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Coordinates from the record if it has them, else the centroid of its country.
fn locate(record: &Record) -> Option<Location> {
    let country = record
        .country()
        .and_then(|c| std::str::from_utf8(&c).ok().map(str::to_owned));
    if let Some((lat, lon)) = record.coordinates() {
        return Some(Location {
            lat,
            lon,
            country,
            precision: Precision::Coordinates,
        });
    }
    let (lat, lon) = centroid(country.as_deref()?)?;
    Some(Location {
        lat,
        lon,
        country,
        precision: Precision::CountryCentroid,
    })
}

fn io_error(path: &Path, source: std::io::Error) -> GeoDbError {
    GeoDbError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests;
