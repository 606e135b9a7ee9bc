//! Decoding the few fields a lookup needs from an MMDB record, whatever the vendor's schema.
//!
//! A single pass over the record's top-level map picks out `location.{latitude,longitude}`
//! (GeoIP2/GeoLite2 City, DB-IP City), `country.iso_code` and `registered_country.iso_code`
//! (GeoIP2 Country/City), a flat `country_code` (DB-IP Lite country, ip-location-db) or a flat
//! two-letter `country` (ipinfo), and flat `latitude`/`longitude`. Everything else is skipped
//! without being decoded. Values of an unexpected type are ignored rather than failing the
//! lookup, because vendors disagree on what `country` holds.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The parts of one record that locate a client.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct Record {
    pub location: Place,
    pub country: Place,
    pub registered_country: Place,
    pub country_code: Scalar,
    pub latitude: Scalar,
    pub longitude: Scalar,
}

impl Record {
    /// The most specific country code: where the address is used, else where it is registered.
    pub fn country(&self) -> Option<[u8; 2]> {
        self.country
            .iso_code
            .or(self.country_code.code())
            .or(self.registered_country.iso_code)
    }

    /// Coordinates carried by the record itself, if both halves are present and valid.
    pub fn coordinates(&self) -> Option<(f64, f64)> {
        let nested = self.location.latitude.zip(self.location.longitude);
        let flat = self.latitude.number().zip(self.longitude.number());
        nested
            .or(flat)
            .filter(|&(lat, lon)| valid_coordinates(lat, lon))
    }
}

pub(crate) fn valid_coordinates(lat: f64, lon: f64) -> bool {
    lat.is_finite()
        && lon.is_finite()
        && (-90.0..=90.0).contains(&lat)
        && (-180.0..=180.0).contains(&lon)
}

/// A nested map such as `location` or `country`; only the fields used here.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct Place {
    pub iso_code: Option<[u8; 2]>,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
}

/// A leaf value: a number, a two-letter code, or something this crate does not use.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) enum Scalar {
    #[default]
    Other,
    Number(f64),
    Code([u8; 2]),
}

impl Scalar {
    fn number(self) -> Option<f64> {
        match self {
            Scalar::Number(n) => Some(n),
            _ => None,
        }
    }

    fn code(self) -> Option<[u8; 2]> {
        match self {
            Scalar::Code(c) => Some(c),
            _ => None,
        }
    }
}

/// Two ASCII letters, upper-cased; anything else (country names, "", "EUR") is not a code.
fn country_code(s: &str) -> Option<[u8; 2]> {
    match s.as_bytes() {
        [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
            Some([a.to_ascii_uppercase(), b.to_ascii_uppercase()])
        }
        _ => None,
    }
}

/// Keys of interest at either level of the record.
enum Key {
    Location,
    Country,
    RegisteredCountry,
    CountryCode,
    IsoCode,
    Latitude,
    Longitude,
    Other,
}

impl Key {
    fn from_bytes(b: &[u8]) -> Key {
        match b {
            b"location" => Key::Location,
            b"country" => Key::Country,
            b"registered_country" => Key::RegisteredCountry,
            b"country_code" => Key::CountryCode,
            b"iso_code" => Key::IsoCode,
            b"latitude" => Key::Latitude,
            b"longitude" => Key::Longitude,
            _ => Key::Other,
        }
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key::from_bytes(v.as_bytes()))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Key, E> {
                Ok(Key::from_bytes(v))
            }
        }
        d.deserialize_identifier(KeyVisitor)
    }
}

/// Implements the visitor methods shared by the lenient visitors: every value that is not
/// what the visitor looks for becomes the default instead of an error.
macro_rules! lenient_scalars {
    () => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Default::default())
        }
    };
}

/// Implements the numeric visitor methods by converting to `f64` with `$wrap`.
macro_rules! numbers {
    ($wrap:expr) => {
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok($wrap(v as f64))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok($wrap(v as f64))
        }
        fn visit_i128<E: de::Error>(self, v: i128) -> Result<Self::Value, E> {
            Ok($wrap(v as f64))
        }
        fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
            Ok($wrap(v as f64))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok($wrap(v))
        }
    };
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            lenient_scalars!();
            numbers!(Scalar::Number);
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(country_code(v).map_or(Scalar::Other, Scalar::Code))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
        }
        d.deserialize_any(ScalarVisitor)
    }
}

impl<'de> Deserialize<'de> for Place {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PlaceVisitor;
        impl<'de> Visitor<'de> for PlaceVisitor {
            type Value = Place;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }
            lenient_scalars!();
            numbers!(|_| Place::default());
            // ipinfo-style flat `"country": "US"`.
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Place, E> {
                Ok(Place {
                    iso_code: country_code(v),
                    ..Place::default()
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Place, A::Error> {
                let mut place = Place::default();
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::IsoCode => place.iso_code = map.next_value::<Scalar>()?.code(),
                        Key::Latitude => place.latitude = map.next_value::<Scalar>()?.number(),
                        Key::Longitude => place.longitude = map.next_value::<Scalar>()?.number(),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(place)
            }
        }
        d.deserialize_any(PlaceVisitor)
    }
}

impl<'de> Deserialize<'de> for Record {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RecordVisitor;
        impl<'de> Visitor<'de> for RecordVisitor {
            type Value = Record;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Record, A::Error> {
                let mut r = Record::default();
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Location => r.location = map.next_value()?,
                        Key::Country => r.country = map.next_value()?,
                        Key::RegisteredCountry => r.registered_country = map.next_value()?,
                        Key::CountryCode => r.country_code = map.next_value()?,
                        Key::Latitude => r.latitude = map.next_value()?,
                        Key::Longitude => r.longitude = map.next_value()?,
                        Key::IsoCode | Key::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(r)
            }
        }
        d.deserialize_map(RecordVisitor)
    }
}
