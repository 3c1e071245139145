//! Small constructors for the Envoy protobuf shapes translate uses again and again.

use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3::Address;
use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, SocketAddress, address, config_source,
    socket_address,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration, UInt32Value};
use prost::Name;

/// Packs a message into an `Any` with its Envoy type URL.
pub fn any<M: Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// A TCP socket address.
pub fn socket_address(ip: IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// Address from a `SocketAddr`.
pub fn address_of(addr: SocketAddr) -> Address {
    socket_address(addr.ip(), addr.port())
}

/// A config source that says "over the ADS stream".
pub fn ads_config_source() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

/// Whole milliseconds as a protobuf duration.
pub fn millis(ms: u64) -> Duration {
    Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

/// A duration as protobuf's.
pub fn protobuf_duration(d: std::time::Duration) -> Duration {
    Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A wrapped bool.
pub fn bool_value(value: bool) -> BoolValue {
    BoolValue { value }
}

/// A wrapped u32.
pub fn u32_value(value: u32) -> UInt32Value {
    UInt32Value { value }
}

/// A network filter entry holding `config`.
pub fn network_filter<M: Name>(name: &str, config: &M) -> Filter {
    Filter {
        name: name.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(any(config))),
    }
}

/// An HTTP filter with a typed config.
pub fn http_filter<M: Name>(name: &str, config: &M) -> HttpFilter {
    HttpFilter {
        name: name.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(config))),
        ..Default::default()
    }
}

/// A `tcp_proxy` network filter to one cluster, with no idle timeout.
pub fn tcp_proxy_filter(stat_prefix: &str, cluster: tcp_proxy::ClusterSpecifier) -> Filter {
    network_filter(
        "envoy.filters.network.tcp_proxy",
        &TcpProxy {
            stat_prefix: stat_prefix.to_string(),
            cluster_specifier: Some(cluster),
            // Envoy's default 1 h idle timeout cuts pooled database connections that an
            // app keeps open for longer; keepalive finds dead peers instead.
            idle_timeout: Some(Duration::default()),
            ..Default::default()
        },
    )
}
