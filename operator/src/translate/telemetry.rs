//! Access logs and tracing of the HTTP connection managers, as MeshConfig `telemetry`
//! asks: by default one JSON line per request on the sidecar's stdout, naming both
//! identities, the route, the upstream and the flags; spans to a collector once one is
//! named.

use envoy_types::pb::envoy::config::accesslog::v3::{
    AccessLog, AccessLogFilter, ComparisonFilter, OrFilter, ResponseFlagFilter, RuntimeFilter,
    StatusCodeFilter, access_log, access_log_filter, comparison_filter,
};
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, DataSource, GrpcService, HttpService, HttpUri, RuntimeUInt32, SocketAddress,
    SubstitutionFormatString, TypedExtensionConfig, address, data_source, grpc_service, http_uri,
    socket_address, substitution_format_string,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::trace::v3::{
    OpenTelemetryConfig, ZipkinConfig, tracing as trace, zipkin_config,
};
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::StdoutAccessLog;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing;
use envoy_types::pb::envoy::extensions::tracers::opentelemetry::resource_detectors::v3::EnvironmentResourceDetectorConfig;
use envoy_types::pb::envoy::r#type::tracing::v3::{CustomTag, custom_tag};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, Percent, fractional_percent};
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value};
use prost::{Message, Name};
use weft_crds::telemetry::{
    AccessLogFormat, Fraction, TelemetrySettings, TracingProtocol,
};

use super::envoy::{any, millis};
use super::http::{UpstreamHttp, upstream_protocol_options};

/// Which side of the sidecar a connection manager serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The app's calls out.
    Outbound,
    /// Calls to the app.
    Inbound,
}

/// The fields of an access log line, in the order they are encoded.
impl Direction {
    /// Its name in logs and spans.
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    /// The formatters of the call's source and destination SPIFFE IDs: outbound the
    /// sidecar is the TLS client (its own identity is the local one), inbound the server.
    fn identities(self) -> (&'static str, &'static str) {
        match self {
            Direction::Outbound => ("%UPSTREAM_LOCAL_URI_SAN%", "%UPSTREAM_PEER_URI_SAN%"),
            Direction::Inbound => ("%DOWNSTREAM_PEER_URI_SAN%", "%DOWNSTREAM_LOCAL_URI_SAN%"),
        }
    }
}

fn fields(direction: Direction) -> Vec<(&'static str, &'static str)> {
    let (source, destination) = direction.identities();
    vec![
        ("time", "%START_TIME%"),
        ("direction", direction.as_str()),
        ("source_identity", source),
        ("destination_identity", destination),
        ("method", "%REQ(:METHOD)%"),
        ("authority", "%REQ(:AUTHORITY)%"),
        ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
        ("protocol", "%PROTOCOL%"),
        ("status", "%RESPONSE_CODE%"),
        ("flags", "%RESPONSE_FLAGS%"),
        ("route", "%ROUTE_NAME%"),
        ("upstream_cluster", "%UPSTREAM_CLUSTER%"),
        ("upstream_host", "%UPSTREAM_HOST%"),
        ("duration_ms", "%DURATION%"),
        ("bytes_received", "%BYTES_RECEIVED%"),
        ("bytes_sent", "%BYTES_SENT%"),
        ("traceparent", "%REQ(TRACEPARENT)%"),
    ]
}

/// A `google.protobuf.Struct` encoded with its fields in the given order. Protobuf maps
/// encode in hash order, so a Struct built and encoded twice would differ, and every
/// listener carrying it would look changed at each translation.
fn ordered_struct(fields: &[(&str, &str)]) -> Vec<u8> {
    fields
        .iter()
        .flat_map(|(k, v)| {
            // A one-entry map encodes deterministically; entries concatenate.
            Struct {
                fields: [(
                    k.to_string(),
                    Value {
                        kind: Some(value::Kind::StringValue(v.to_string())),
                    },
                )]
                .into(),
            }
            .encode_to_vec()
        })
        .collect()
}

/// A length-delimited protobuf field: tag `field`, wire type 2.
fn length_delimited(field: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 6);
    prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// `SubstitutionFormatString.json_format` (field 2), then `StdoutAccessLog.log_format`
/// (field 1).
const JSON_FORMAT_FIELD: u32 = 2;
const LOG_FORMAT_FIELD: u32 = 1;

/// The encoded `StdoutAccessLog` of one format.
fn stdout_config(direction: Direction, format: AccessLogFormat) -> Vec<u8> {
    let encoded = match format {
        AccessLogFormat::Json => {
            let mut format = SubstitutionFormatString::default().encode_to_vec();
            format.extend(length_delimited(
                JSON_FORMAT_FIELD,
                &ordered_struct(&fields(direction)),
            ));
            format
        }
        AccessLogFormat::Text => {
            let line: Vec<String> = fields(direction)
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            SubstitutionFormatString {
                format: Some(substitution_format_string::Format::TextFormatSource(
                    DataSource {
                        specifier: Some(data_source::Specifier::InlineString(format!(
                            "{}\n",
                            line.join(" ")
                        ))),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }
            .encode_to_vec()
        }
    };
    length_delimited(LOG_FORMAT_FIELD, &encoded)
}

/// A share in millionths, the finest denominator Envoy has.
fn fractional_percent(share: Fraction) -> FractionalPercent {
    let millionths = u64::from(share.numerator) * 1_000_000 / u64::from(share.denominator.max(1));
    FractionalPercent {
        numerator: u32::try_from(millionths.min(1_000_000)).unwrap_or(1_000_000),
        denominator: fractional_percent::DenominatorType::Million as i32,
    }
}

/// Logs a sampled share of the requests, and every failed one: a 5xx status, or any
/// response flag (reset, timeout, no route, rate limited, ...).
fn sampled_or_failed(share: Fraction) -> AccessLogFilter {
    let filter = |f| AccessLogFilter {
        filter_specifier: Some(f),
    };
    filter(access_log_filter::FilterSpecifier::OrFilter(OrFilter {
        filters: vec![
            filter(access_log_filter::FilterSpecifier::StatusCodeFilter(
                StatusCodeFilter {
                    comparison: Some(ComparisonFilter {
                        op: comparison_filter::Op::Ge as i32,
                        value: Some(RuntimeUInt32 {
                            default_value: 500,
                            runtime_key: "weft.access_log.failed_status".to_string(),
                        }),
                    }),
                },
            )),
            filter(access_log_filter::FilterSpecifier::ResponseFlagFilter(
                ResponseFlagFilter::default(),
            )),
            filter(access_log_filter::FilterSpecifier::RuntimeFilter(
                RuntimeFilter {
                    runtime_key: "weft.access_log.sampling".to_string(),
                    percent_sampled: Some(fractional_percent(share)),
                    use_independent_randomness: true,
                },
            )),
        ],
    }))
}

/// The access logs of a connection manager on `direction`'s side: none when turned
/// off, else one on stdout in the configured format and share.
pub fn access_logs(direction: Direction, telemetry: &TelemetrySettings) -> Vec<AccessLog> {
    let settings = telemetry.access_log.clone().unwrap_or_default();
    if settings.enabled == Some(false) {
        return Vec::new();
    }
    let format = settings.format.unwrap_or(AccessLogFormat::Json);
    vec![AccessLog {
        name: "envoy.access_loggers.stdout".to_string(),
        filter: settings
            .sampling
            .filter(|s| s.numerator < s.denominator)
            .map(sampled_or_failed),
        config_type: Some(access_log::ConfigType::TypedConfig(Any {
            type_url: StdoutAccessLog::type_url(),
            value: stdout_config(direction, format),
        })),
    }]
}

/// The cluster sidecars send spans to.
pub const TRACING_COLLECTOR_CLUSTER: &str = "weft-tracing-collector";

/// How long a span export may take before the sidecar gives up on it.
const EXPORT_TIMEOUT_MS: u64 = 5_000;

/// The default share of requests that start a trace.
const DEFAULT_TRACE_SAMPLING: Fraction = Fraction {
    numerator: 1,
    denominator: 100,
};

/// The tracer of every connection manager, when tracing is on and the collector is a
/// valid `host:port` (the index reports it otherwise).
pub fn tracing(direction: Direction, telemetry: &TelemetrySettings) -> Option<Tracing> {
    let settings = telemetry.tracing.as_ref()?;
    let (host, _) = settings.host_port()?;
    let protocol = settings.protocol.unwrap_or(TracingProtocol::OtlpGrpc);
    let provider = match protocol {
        TracingProtocol::OtlpGrpc | TracingProtocol::OtlpHttp => {
            let mut config = OpenTelemetryConfig {
                // The sidecar's environment names its workload (OTEL_RESOURCE_ATTRIBUTES,
                // set by the injector), so one shared listener serves every workload.
                resource_detectors: vec![TypedExtensionConfig {
                    name: "envoy.tracers.opentelemetry.resource_detectors.environment".to_string(),
                    typed_config: Some(any(&EnvironmentResourceDetectorConfig::default())),
                }],
                ..Default::default()
            };
            if protocol == TracingProtocol::OtlpGrpc {
                config.grpc_service = Some(GrpcService {
                    target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                        grpc_service::EnvoyGrpc {
                            cluster_name: TRACING_COLLECTOR_CLUSTER.to_string(),
                            authority: host.to_string(),
                            ..Default::default()
                        },
                    )),
                    timeout: Some(millis(EXPORT_TIMEOUT_MS)),
                    ..Default::default()
                });
            } else {
                config.http_service = Some(HttpService {
                    http_uri: Some(HttpUri {
                        uri: format!("http://{}/v1/traces", settings.collector),
                        timeout: Some(millis(EXPORT_TIMEOUT_MS)),
                        http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(
                            TRACING_COLLECTOR_CLUSTER.to_string(),
                        )),
                    }),
                    ..Default::default()
                });
            }
            trace::Http {
                name: "envoy.tracers.opentelemetry".to_string(),
                config_type: Some(trace::http::ConfigType::TypedConfig(any(&config))),
            }
        }
        TracingProtocol::Zipkin => trace::Http {
            name: "envoy.tracers.zipkin".to_string(),
            config_type: Some(trace::http::ConfigType::TypedConfig(any(&ZipkinConfig {
                collector_cluster: TRACING_COLLECTOR_CLUSTER.to_string(),
                collector_endpoint: "/api/v2/spans".to_string(),
                collector_hostname: host.to_string(),
                collector_endpoint_version: zipkin_config::CollectorEndpointVersion::HttpJson
                    as i32,
                trace_id_128bit: true,
                trace_context_option: zipkin_config::TraceContextOption::UseB3WithW3cPropagation
                    as i32,
                ..Default::default()
            }))),
        },
    };
    Some(Tracing {
        random_sampling: Some(Percent {
            value: settings
                .sampling
                .unwrap_or(DEFAULT_TRACE_SAMPLING)
                .percent(),
        }),
        custom_tags: span_tags(direction),
        provider: Some(provider),
        ..Default::default()
    })
}

/// Tags on every span: both SPIFFE identities of the call and the side of the sidecar.
fn span_tags(direction: Direction) -> Vec<CustomTag> {
    let (source, destination) = direction.identities();
    let tag = |tag: &str, value: custom_tag::Type| CustomTag {
        tag: tag.to_string(),
        r#type: Some(value),
    };
    vec![
        tag(
            "weft.direction",
            custom_tag::Type::Literal(custom_tag::Literal {
                value: direction.as_str().to_string(),
            }),
        ),
        tag(
            "weft.source.identity",
            custom_tag::Type::Value(source.to_string()),
        ),
        tag(
            "weft.destination.identity",
            custom_tag::Type::Value(destination.to_string()),
        ),
    ]
}

/// The collector's cluster, when tracing is on: resolved by DNS (an IP works too).
pub fn tracing_collector(telemetry: &TelemetrySettings) -> Option<Cluster> {
    let settings = telemetry.tracing.as_ref()?;
    let (host, port) = settings.host_port()?;
    let endpoint = LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(socket_address_named(host, port)),
            ..Default::default()
        })),
        ..Default::default()
    };
    let mut cluster = Cluster {
        name: TRACING_COLLECTOR_CLUSTER.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::StrictDns as i32,
        )),
        connect_timeout: Some(millis(EXPORT_TIMEOUT_MS)),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: TRACING_COLLECTOR_CLUSTER.to_string(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![endpoint],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    if settings.protocol.unwrap_or(TracingProtocol::OtlpGrpc) == TracingProtocol::OtlpGrpc {
        cluster.typed_extension_protocol_options = upstream_protocol_options(UpstreamHttp::Http2);
    }
    Some(cluster)
}

/// A socket address whose host may be a DNS name.
fn socket_address_named(host: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: host.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::stdout_access_log;

    fn access_log(direction: Direction) -> AccessLog {
        let mut logs = access_logs(direction, &TelemetrySettings::default());
        assert_eq!(logs.len(), 1, "one access log by default");
        logs.remove(0)
    }

    #[test]
    fn the_format_decodes_with_every_field_and_encodes_the_same_every_time() {
        let log = access_log(Direction::Inbound);
        assert!(log.filter.is_none(), "every request is logged by default");
        let Some(access_log::ConfigType::TypedConfig(any)) = &log.config_type else {
            panic!("no typed config");
        };
        let decoded = StdoutAccessLog::decode(any.value.as_slice()).unwrap();
        let Some(stdout_access_log::AccessLogFormat::LogFormat(format)) = decoded.access_log_format
        else {
            panic!("no log format");
        };
        let Some(envoy_types::pb::envoy::config::core::v3::substitution_format_string::Format::JsonFormat(json)) = format.format else {
            panic!("not a JSON format");
        };
        assert_eq!(json.fields.len(), fields(Direction::Inbound).len());
        assert!(matches!(
            &json.fields["source_identity"].kind,
            Some(value::Kind::StringValue(s)) if s == "%DOWNSTREAM_PEER_URI_SAN%"
        ));
        // Built twice, the bytes are the same (a protobuf map would not be).
        assert_eq!(access_log(Direction::Inbound), log);
    }

    fn settings(yaml: &str) -> TelemetrySettings {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn sampling_keeps_every_failure_and_a_share_of_the_rest_and_off_means_none() {
        let logs = access_logs(
            Direction::Outbound,
            &settings("accessLog: {sampling: {numerator: 1, denominator: 8}}"),
        );
        let Some(access_log_filter::FilterSpecifier::OrFilter(or)) =
            logs[0].filter.clone().unwrap().filter_specifier
        else {
            panic!("an OR filter: {:?}", logs[0].filter);
        };
        assert_eq!(or.filters.len(), 3);
        let Some(access_log_filter::FilterSpecifier::RuntimeFilter(sampled)) =
            &or.filters[2].filter_specifier
        else {
            panic!("a runtime filter last");
        };
        assert_eq!(sampled.percent_sampled.unwrap().numerator, 125_000);
        // All of them: no filter.
        let all = access_logs(
            Direction::Outbound,
            &settings("accessLog: {sampling: {numerator: 5, denominator: 5}}"),
        );
        assert!(all[0].filter.is_none());
        assert!(
            access_logs(Direction::Inbound, &settings("accessLog: {enabled: false}")).is_empty()
        );
    }

    #[test]
    fn the_text_format_has_the_json_fields_in_order() {
        let logs = access_logs(Direction::Inbound, &settings("accessLog: {format: Text}"));
        let Some(access_log::ConfigType::TypedConfig(any)) = &logs[0].config_type else {
            panic!("no typed config");
        };
        let decoded = StdoutAccessLog::decode(any.value.as_slice()).unwrap();
        let text = format!("{decoded:?}");
        assert!(
            text.contains(
                "time=%START_TIME% direction=inbound source_identity=%DOWNSTREAM_PEER_URI_SAN%"
            ),
            "{text}"
        );
    }

    #[test]
    fn tracing_needs_a_collector_and_names_the_protocol_and_sampling() {
        assert!(tracing(Direction::Inbound, &TelemetrySettings::default()).is_none());
        assert!(tracing_collector(&TelemetrySettings::default()).is_none());
        let otlp = settings("tracing: {collector: 'otel.observability:4317'}");
        let t = tracing(Direction::Outbound, &otlp).unwrap();
        assert_eq!(t.random_sampling.unwrap().value, 1.0);
        assert_eq!(t.provider.unwrap().name, "envoy.tracers.opentelemetry");
        assert_eq!(t.custom_tags.len(), 3);
        let cluster = tracing_collector(&otlp).unwrap();
        assert_eq!(cluster.name, TRACING_COLLECTOR_CLUSTER);
        assert!(
            !cluster.typed_extension_protocol_options.is_empty(),
            "gRPC needs HTTP/2"
        );
        let zipkin = settings(
            "tracing: {collector: '[fd00::1]:9411', protocol: Zipkin, sampling: {numerator: 1, denominator: 1000}}",
        );
        let t = tracing(Direction::Inbound, &zipkin).unwrap();
        assert_eq!(t.random_sampling.unwrap().value, 0.1);
        assert_eq!(t.provider.unwrap().name, "envoy.tracers.zipkin");
        assert_eq!(
            zipkin.tracing.as_ref().unwrap().host_port(),
            Some(("fd00::1", 9411))
        );
        assert!(
            tracing(
                Direction::Inbound,
                &settings("tracing: {collector: nonsense}")
            )
            .is_none()
        );
    }
}
