//! MeshConfig `telemetry`: the sidecars' access logs and distributed tracing.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the sidecars report besides their metrics.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySettings {
    /// Access logs on each sidecar's stdout (on by default, JSON, every request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogSettings>,
    /// Distributed tracing (off until a collector is named).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSettings>,
}

/// Access log settings.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AccessLogSettings {
    /// Whether sidecars write access logs at all; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Line format; default `JSON`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<AccessLogFormat>,
    /// The share of successful requests logged; failed ones (status 5xx or any
    /// response flag) are always logged. Default: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<Fraction>,
}

/// The format of an access log line.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// One JSON object per line, fields in a fixed order.
    #[serde(rename = "JSON")]
    Json,
    /// `key=value` pairs separated by spaces, in the same order.
    Text,
}

/// Tracing settings.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TracingSettings {
    /// Where spans go: `host:port` of an OpenTelemetry collector (a DNS name or an IP).
    #[schemars(length(min = 1, max = 253))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[A-Za-z0-9.-]+:[0-9]{1,5}$') || self.matches('^\\\\[[0-9A-Fa-f:.]+\\\\]:[0-9]{1,5}$')",
        "message": "must be host:port"
    }]))]
    pub collector: String,
    /// How spans are sent and which headers carry the trace; default `OTLPGRPC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<TracingProtocol>,
    /// The share of requests that start a trace; a request arriving with a sampled
    /// trace context is always traced. Default 1/100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<Fraction>,
}

/// The tracer: the wire spans go over and the propagation headers that come with it.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum TracingProtocol {
    /// OTLP over gRPC (collector port 4317 usually); W3C `traceparent` propagation.
    #[serde(rename = "OTLPGRPC")]
    OtlpGrpc,
    /// OTLP over HTTP, protobuf to `/v1/traces` (port 4318 usually); W3C propagation.
    #[serde(rename = "OTLPHTTP")]
    OtlpHttp,
    /// Zipkin v2 JSON to `/api/v2/spans` (the collector's Zipkin receiver, port 9411
    /// usually); B3 headers extracted, and both B3 and W3C `traceparent` propagated.
    Zipkin,
}

/// A share, as Gateway API writes one (`RequestMirror.fraction`): numerator over
/// denominator, at most 1. Integers, because API conventions avoid floats.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.numerator <= self.denominator",
    "message": "numerator must be less than or equal to denominator"
}]))]
pub struct Fraction {
    /// Numerator.
    #[schemars(range(min = 0))]
    pub numerator: u32,
    /// Denominator; default 100.
    #[serde(default = "hundred")]
    #[schemars(range(min = 1, max = 1000000))]
    pub denominator: u32,
}

fn hundred() -> u32 {
    100
}

impl Fraction {
    /// The share as a percentage.
    pub fn percent(self) -> f64 {
        f64::from(self.numerator) * 100.0 / f64::from(self.denominator.max(1))
    }
}

impl TracingSettings {
    /// The collector's host and port (an IPv6 host without its brackets), if
    /// `collector` is a valid `host:port`.
    pub fn host_port(&self) -> Option<(&str, u16)> {
        let (host, port) = self.collector.rsplit_once(':')?;
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.strip_suffix(']')?,
            None => host,
        };
        let valid = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b));
        let port: u16 = port.parse().ok()?;
        (valid && port > 0).then_some((host, port))
    }
}

impl TelemetrySettings {
    /// What is wrong with these settings, and the settings with the wrong parts
    /// dropped (their defaults apply): for local mode, where no API server checks.
    pub fn checked(&self) -> (Self, Vec<String>) {
        let mut settings = self.clone();
        let mut problems = Vec::new();
        let mut fraction = |slot: &mut Option<Fraction>, field: &str| {
            if let Some(f) = slot
                && (f.denominator == 0 || f.numerator > f.denominator)
            {
                problems.push(format!(
                    "{field} {}/{}: the numerator must be at most the denominator, which must not be 0; the default applies",
                    f.numerator, f.denominator
                ));
                *slot = None;
            }
        };
        if let Some(log) = &mut settings.access_log {
            fraction(&mut log.sampling, "spec.telemetry.accessLog.sampling");
        }
        if let Some(tracing) = &mut settings.tracing {
            fraction(&mut tracing.sampling, "spec.telemetry.tracing.sampling");
        }
        if let Some(tracing) = &settings.tracing
            && tracing.host_port().is_none()
        {
            problems.push(format!(
                "spec.telemetry.tracing.collector {:?} is not host:port; tracing stays off",
                tracing.collector
            ));
            settings.tracing = None;
        }
        (settings, problems)
    }
}
