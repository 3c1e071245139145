//! Resources encoded once: the bytes of one `DiscoveryResponse.resources` entry.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use bytes::{Bytes, BytesMut};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

/// Type URLs of the xDS resource types Weft serves.
pub mod type_url {
    /// Cluster (CDS).
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    /// ClusterLoadAssignment (EDS).
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    /// Listener (LDS).
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    /// RouteConfiguration (RDS).
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    /// Secret (SDS).
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    /// ScopedRouteConfiguration (SRDS): which route table a request's scope key selects.
    pub const SCOPED_ROUTE: &str =
        "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration";

    /// The order updates go out in: clusters before the routes that use them.
    pub const PUSH_ORDER: [&str; 6] = [CLUSTER, ENDPOINT, SECRET, LISTENER, SCOPED_ROUTE, ROUTE];

    /// The constant of a type URL this server serves, if it is one.
    pub fn known(type_url: &str) -> Option<&'static str> {
        PUSH_ORDER.into_iter().find(|t| *t == type_url)
    }

    /// `types` in [`PUSH_ORDER`], then any others in their own order.
    pub fn in_push_order<'a>(types: impl Iterator<Item = &'a String> + Clone) -> Vec<String> {
        let mut ordered: Vec<String> = PUSH_ORDER
            .iter()
            .filter(|t| types.clone().any(|have| have == *t))
            .map(|t| t.to_string())
            .collect();
        ordered.extend(types.filter(|t| !PUSH_ORDER.contains(&t.as_str())).cloned());
        ordered
    }

    /// Whether an empty subscription means "everything" for this type.
    pub fn is_wildcard_type(type_url: &str) -> bool {
        type_url == CLUSTER || type_url == LISTENER || type_url == SCOPED_ROUTE
    }

    /// Short name for logs and status output (`CDS`, `EDS`, ...).
    pub fn short_name(type_url: &str) -> &'static str {
        match type_url {
            CLUSTER => "CDS",
            ENDPOINT => "EDS",
            LISTENER => "LDS",
            ROUTE => "RDS",
            SECRET => "SDS",
            SCOPED_ROUTE => "SRDS",
            _ => "unknown",
        }
    }
}

/// Field number of `resources` in `DiscoveryResponse`.
const RESOURCES_FIELD: u32 = 2;

/// One named xDS resource, encoded once and shared between streams; a clone is a
/// reference count increment.
#[derive(Clone, Debug)]
pub struct Resource(Arc<ResourceInner>);

impl Eq for Resource {}

#[derive(Debug)]
struct ResourceInner {
    name: String,
    version: String,
    /// Tag + length + `Any` bytes, ready to be spliced into a `DiscoveryResponse`: a
    /// slice of `delta_entry`, which holds the same bytes as its field 2.
    entry: Bytes,
    /// The same as a `DeltaDiscoveryResponse.resources` entry (a `Resource` message with
    /// version, the `Any` and name).
    delta_entry: Bytes,
}

impl PartialEq for Resource {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.name == other.0.name && self.0.entry == other.0.entry)
    }
}

impl Resource {
    /// Encodes `message` as an `Any` of `type_url`; the version is a hash of the bytes.
    pub fn encode<M: Message>(type_url: &str, name: impl Into<String>, message: &M) -> Self {
        let any = envoy_types::pb::google::protobuf::Any {
            type_url: type_url.to_string(),
            value: message.encode_to_vec(),
        };
        let any_len = any.encoded_len();
        let mut entry = Vec::with_capacity(1 + encoded_len_varint(any_len as u64) + any_len);
        encode_key(RESOURCES_FIELD, WireType::LengthDelimited, &mut entry);
        encode_varint(any_len as u64, &mut entry);
        any.encode_raw(&mut entry);
        let name = name.into();
        let version = format!("{:016x}", fnv1a(&entry));
        // One buffer for both forms: the delta `Resource` message carries the `Any` as
        // field 2, the very tag and bytes of the state-of-the-world entry.
        let string_len = |s: &str| 1 + encoded_len_varint(s.len() as u64) + s.len();
        let body_len = string_len(&version) + entry.len() + string_len(&name);
        let mut buf = BytesMut::with_capacity(1 + encoded_len_varint(body_len as u64) + body_len);
        encode_key(RESOURCES_FIELD, WireType::LengthDelimited, &mut buf);
        encode_varint(body_len as u64, &mut buf);
        encode_key(1, WireType::LengthDelimited, &mut buf);
        encode_varint(version.len() as u64, &mut buf);
        buf.extend_from_slice(version.as_bytes());
        let start = buf.len();
        buf.extend_from_slice(&entry);
        let end = buf.len();
        encode_key(3, WireType::LengthDelimited, &mut buf);
        encode_varint(name.len() as u64, &mut buf);
        buf.extend_from_slice(name.as_bytes());
        let delta_entry = buf.freeze();
        Self(Arc::new(ResourceInner {
            entry: delta_entry.slice(start..end),
            delta_entry,
            name,
            version,
        }))
    }

    /// The resource's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Content hash; equal bytes give equal versions.
    pub fn version(&self) -> &str {
        &self.0.version
    }

    /// The encoded `resources` entry of a `DiscoveryResponse`.
    pub fn entry(&self) -> &Bytes {
        &self.0.entry
    }

    /// The encoded `resources` entry of a `DeltaDiscoveryResponse`: a `Resource` message
    /// with version (field 1), the `Any` (field 2, the very bytes of [`Resource::entry`])
    /// and name (field 3).
    pub fn delta_entry(&self) -> &Bytes {
        &self.0.delta_entry
    }

    /// Decodes the resource back into its `Any` (for tests and debugging output).
    pub fn to_any(&self) -> Option<envoy_types::pb::google::protobuf::Any> {
        let mut body = self.0.entry.clone();
        let _key = prost::encoding::decode_key(&mut body).ok()?;
        let _len = prost::encoding::decode_varint(&mut body).ok()?;
        envoy_types::pb::google::protobuf::Any::decode(body).ok()
    }
}

/// Holds one copy of equal resources. A proxy's own resources are often the very same
/// bytes as another proxy's (the trust bundle, the inbound listener of a port no grant
/// names, the health-probe listener); interned, every proxy that has one shares it
/// instead of holding its own encoding. Only weak references are kept: a resource no
/// snapshot holds any more is dropped as usual.
#[derive(Debug, Default)]
pub struct ResourceInterner {
    /// By a hash of name and bytes; a collision (or a dead entry) just keeps the new one.
    held: HashMap<u64, Weak<ResourceInner>>,
    /// Entries after the last sweep of dead ones: the next sweep waits for twice this.
    swept_len: usize,
}

impl ResourceInterner {
    /// The held resource equal to `resource`, or `resource`, now held.
    pub fn intern(&mut self, resource: Resource) -> Resource {
        let key =
            fnv1a(resource.0.entry.as_ref()) ^ fnv1a(resource.0.name.as_bytes()).rotate_left(1);
        if let Some(held) = self.held.get(&key).and_then(Weak::upgrade) {
            let held = Resource(held);
            if held == resource {
                return held;
            }
        }
        self.held.insert(key, Arc::downgrade(&resource.0));
        if self.held.len() > 2 * self.swept_len.max(1024) {
            self.held.retain(|_, w| w.strong_count() > 0);
            self.swept_len = self.held.len();
        }
        resource
    }
}

/// 64-bit FNV-1a: stable across runs and Rust versions, unlike `DefaultHasher`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
