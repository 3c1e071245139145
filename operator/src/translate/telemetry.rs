//! Access logs: one JSON line per request on the sidecar's stdout, from every HTTP
//! connection manager, naming both identities, the route, the upstream and the flags.

use envoy_types::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
use envoy_types::pb::envoy::config::core::v3::SubstitutionFormatString;
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::StdoutAccessLog;
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value};
use prost::{Message, Name};

/// Which side of the sidecar a connection manager serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The app's calls out.
    Outbound,
    /// Calls to the app.
    Inbound,
}

/// The fields of an access log line, in the order they are encoded.
fn fields(direction: Direction) -> Vec<(&'static str, &'static str)> {
    // Outbound the sidecar is the TLS client (its own identity is the local one);
    // inbound it is the server.
    let (source, destination) = match direction {
        Direction::Outbound => ("%UPSTREAM_LOCAL_URI_SAN%", "%UPSTREAM_PEER_URI_SAN%"),
        Direction::Inbound => ("%DOWNSTREAM_PEER_URI_SAN%", "%DOWNSTREAM_LOCAL_URI_SAN%"),
    };
    vec![
        ("time", "%START_TIME%"),
        (
            "direction",
            match direction {
                Direction::Outbound => "outbound",
                Direction::Inbound => "inbound",
            },
        ),
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

/// The stdout access log of a connection manager on `direction`'s side.
pub fn access_log(direction: Direction) -> AccessLog {
    let mut format = SubstitutionFormatString::default().encode_to_vec();
    format.extend(length_delimited(
        JSON_FORMAT_FIELD,
        &ordered_struct(&fields(direction)),
    ));
    let stdout = length_delimited(LOG_FORMAT_FIELD, &format);
    AccessLog {
        name: "envoy.access_loggers.stdout".to_string(),
        config_type: Some(access_log::ConfigType::TypedConfig(Any {
            type_url: StdoutAccessLog::type_url(),
            value: stdout,
        })),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::stdout_access_log;

    #[test]
    fn the_format_decodes_with_every_field_and_encodes_the_same_every_time() {
        let log = access_log(Direction::Inbound);
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
}
