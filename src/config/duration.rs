//! Durations in `proxy.toml`: written `"30s"`, `"500ms"`, `"2m"`, or as a
//! number of seconds (`with = "duration"` in `schema`).

use std::time::Duration;

use serde::{Deserialize, Deserializer, de::Error};

#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Secs(u64),
    Float(f64),
    Text(String),
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match Raw::deserialize(d)? {
        Raw::Secs(s) => Ok(Duration::from_secs(s)),
        Raw::Float(f) if f.is_finite() && f >= 0.0 => Ok(Duration::from_secs_f64(f)),
        Raw::Float(f) => Err(D::Error::custom(format!("invalid duration {f}"))),
        Raw::Text(t) if t.trim() == "0" => Ok(Duration::ZERO),
        Raw::Text(t) => humantime::parse_duration(t.trim()).map_err(|e| {
            D::Error::custom(format!(
                "invalid duration {t:?} ({e}); write e.g. \"30s\" or \"500ms\""
            ))
        }),
    }
}

/// An optional duration (absent = inherit).
pub mod optional {
    use std::time::Duration;

    use serde::Deserializer;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::deserialize(d).map(Some)
    }
}
