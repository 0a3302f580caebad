//! `[tracing]`: OpenTelemetry export of one span per transaction over
//! OTLP/HTTP(S). Off unless `otlp_endpoint` is set.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// How spans are encoded on the wire (OTLP/HTTP).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "http/json")]
    HttpJson,
}

impl OtlpProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::HttpProtobuf => "http/protobuf",
            OtlpProtocol::HttpJson => "http/json",
        }
    }
}

/// `[tracing]` (see the module docs).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// The collector: `http://HOST:4318` (`/v1/traces` is added) or the
    /// full URL of its traces path. Default none: nothing is exported.
    pub otlp_endpoint: Option<String>,
    /// `"http/protobuf"` or `"http/json"`. Default `"http/protobuf"`.
    #[serde(default)]
    pub otlp_protocol: OtlpProtocol,
    /// Share of transactions exported among those whose client sent no
    /// `traceparent`; a client's `traceparent` decides by its sampled flag.
    /// Default 1.0.
    #[serde(default = "d_ratio")]
    pub sample_ratio: f64,
    /// Spans waiting for export at most; more are dropped (and counted),
    /// never waited for. Default 4096.
    #[serde(default = "d_queue")]
    pub otlp_queue_size: usize,
    /// Spans per export request at most. Default 512.
    #[serde(default = "d_batch")]
    pub otlp_batch_size: usize,
    /// How long the first span of a batch waits for more. Default `1s`.
    #[serde(default = "d_flush", with = "super::duration")]
    pub otlp_flush_interval: Duration,
    /// Deadline of one export request. Default `10s`.
    #[serde(default = "d_timeout", with = "super::duration")]
    pub otlp_timeout: Duration,
    /// PEM file of the CAs an `https` collector's certificate is checked
    /// against. Default none: the system's roots.
    pub otlp_ca_file: Option<String>,
    /// HTTP headers sent with every export (a hosted collector's key).
    /// Default none.
    #[serde(default)]
    pub otlp_headers: BTreeMap<String, String>,
    /// The spans' `service.name`. Default `"tidepool"`.
    #[serde(default = "d_service")]
    pub service_name: String,
}

impl Default for Tracing {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::default(),
            sample_ratio: d_ratio(),
            otlp_queue_size: d_queue(),
            otlp_batch_size: d_batch(),
            otlp_flush_interval: d_flush(),
            otlp_timeout: d_timeout(),
            otlp_ca_file: None,
            otlp_headers: BTreeMap::new(),
            service_name: d_service(),
        }
    }
}

impl Tracing {
    /// The URL spans are posted to: `otlp_endpoint`, with the traces path
    /// added when it names only a host.
    pub fn traces_url(&self) -> Option<String> {
        let e = self.otlp_endpoint.as_deref()?.trim();
        let after_scheme = e.split_once("://").map_or(e, |(_, rest)| rest);
        Some(match after_scheme.find('/') {
            None => format!("{e}/v1/traces"),
            Some(at) if after_scheme[at..] == *"/" => format!("{}v1/traces", e),
            Some(_) => e.to_owned(),
        })
    }

    /// `(key, value, default)` for `SHOW CONFIG`; header values are not
    /// shown (they are often keys).
    pub(super) fn describe(&self, d: &Tracing) -> Vec<(&'static str, String, String)> {
        let headers = |t: &Tracing| t.otlp_headers.keys().cloned().collect::<Vec<_>>().join(",");
        let dur = |v: Duration| humantime::format_duration(v).to_string();
        vec![
            (
                "otlp_endpoint",
                self.otlp_endpoint.clone().unwrap_or_default(),
                String::new(),
            ),
            (
                "otlp_protocol",
                self.otlp_protocol.as_str().into(),
                d.otlp_protocol.as_str().into(),
            ),
            (
                "sample_ratio",
                self.sample_ratio.to_string(),
                d.sample_ratio.to_string(),
            ),
            (
                "otlp_queue_size",
                self.otlp_queue_size.to_string(),
                d.otlp_queue_size.to_string(),
            ),
            (
                "otlp_batch_size",
                self.otlp_batch_size.to_string(),
                d.otlp_batch_size.to_string(),
            ),
            (
                "otlp_flush_interval",
                dur(self.otlp_flush_interval),
                dur(d.otlp_flush_interval),
            ),
            ("otlp_timeout", dur(self.otlp_timeout), dur(d.otlp_timeout)),
            (
                "otlp_ca_file",
                self.otlp_ca_file.clone().unwrap_or_default(),
                String::new(),
            ),
            ("otlp_headers", headers(self), headers(d)),
            (
                "service_name",
                self.service_name.clone(),
                d.service_name.clone(),
            ),
        ]
    }

    /// Why this section cannot be used, with the key at fault.
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(("sample_ratio", "must be between 0 and 1".into()));
        }
        if self.otlp_queue_size == 0 {
            return Err(("otlp_queue_size", "must be at least 1".into()));
        }
        if self.otlp_batch_size == 0 {
            return Err(("otlp_batch_size", "must be at least 1".into()));
        }
        if self.otlp_timeout.is_zero() {
            return Err(("otlp_timeout", "must be more than 0".into()));
        }
        if let Some(e) = &self.otlp_endpoint {
            let e = e.trim();
            let Some(rest) = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
            else {
                return Err((
                    "otlp_endpoint",
                    format!(
                        "{e:?} is not an http:// or https:// URL (e.g. \"http://127.0.0.1:4318\")"
                    ),
                ));
            };
            let host = rest.split('/').next().unwrap_or_default();
            if host.is_empty() {
                return Err(("otlp_endpoint", format!("{e:?} names no host")));
            }
        }
        if let Some(path) = &self.otlp_ca_file {
            crate::tls::https_client_config(Some(path)).map_err(|e| ("otlp_ca_file", e))?;
        }
        for (k, v) in &self.otlp_headers {
            let name_ok = !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !name_ok {
                return Err(("otlp_headers", format!("{k:?} is not an HTTP header name")));
            }
            if v.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
                return Err((
                    "otlp_headers",
                    format!("the value of {k:?} holds a control character"),
                ));
            }
        }
        Ok(())
    }
}

fn d_ratio() -> f64 {
    1.0
}
fn d_queue() -> usize {
    4096
}
fn d_batch() -> usize {
    512
}
fn d_flush() -> Duration {
    Duration::from_secs(1)
}
fn d_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_service() -> String {
    "tidepool".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_endpoint(e: &str) -> Tracing {
        Tracing {
            otlp_endpoint: Some(e.to_owned()),
            ..Tracing::default()
        }
    }

    #[test]
    fn the_traces_path_is_added_to_a_bare_host() {
        let url = |e: &str| with_endpoint(e).traces_url();
        assert_eq!(
            url("http://127.0.0.1:4318").as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );
        assert_eq!(
            url("http://c:4318/").as_deref(),
            Some("http://c:4318/v1/traces")
        );
        assert_eq!(
            url("http://c:4318/otlp/v1/traces").as_deref(),
            Some("http://c:4318/otlp/v1/traces")
        );
        assert_eq!(Tracing::default().traces_url(), None);
    }

    #[test]
    fn bad_values_name_their_key() {
        let key = |t: Tracing| t.check().err().map(|(k, _)| k);
        assert_eq!(key(Tracing::default()), None);
        assert_eq!(key(with_endpoint("http://c:4318")), None);
        assert_eq!(key(with_endpoint("https://c:4318")), None);
        assert_eq!(key(with_endpoint("ftp://c:4318")), Some("otlp_endpoint"));
        let ca = Tracing {
            otlp_ca_file: Some("/nonexistent/ca.pem".into()),
            ..Tracing::default()
        };
        assert_eq!(key(ca), Some("otlp_ca_file"));
        assert_eq!(key(with_endpoint("c:4318")), Some("otlp_endpoint"));
        assert_eq!(key(with_endpoint("http:///v1")), Some("otlp_endpoint"));
        let ratio = Tracing {
            sample_ratio: 1.5,
            ..Tracing::default()
        };
        assert_eq!(key(ratio), Some("sample_ratio"));
        let nan = Tracing {
            sample_ratio: f64::NAN,
            ..Tracing::default()
        };
        assert_eq!(key(nan), Some("sample_ratio"));
        let mut headers = Tracing::default();
        headers.otlp_headers.insert("bad name".into(), "x".into());
        assert_eq!(key(headers), Some("otlp_headers"));
    }
}
