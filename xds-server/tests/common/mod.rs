//! Resources the state-machine tests share.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use weft_xds::{Resource, type_url};

/// A cluster whose content (and so version) changes with `timeout_ms`.
pub fn cluster(name: &str, timeout_ms: i64) -> Resource {
    let c = Cluster {
        name: name.to_string(),
        connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 0,
            nanos: (timeout_ms * 1_000_000) as i32,
        }),
        ..Default::default()
    };
    Resource::encode(type_url::CLUSTER, name, &c)
}
