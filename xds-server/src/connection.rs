//! The state of one ADS stream (state of the world), with no I/O.
//!
//! The stream task feeds it requests and snapshots; it answers with the responses
//! to send, in make-before-break order, and remembers per type what was sent,
//! what was ACKed and the last NACK.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

use crate::XdsError;
use crate::resource::{Resource, type_url};
use crate::snapshot::{Layer, Served, Snapshot, TypedResources, Version};

/// A response ready to go on the wire; resource bytes are shared, not copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdsResponse {
    /// `version_info` of the response.
    pub version_info: Version,
    /// Type URL of every resource in it.
    pub type_url: String,
    /// Nonce the proxy echoes back in its ACK or NACK.
    pub nonce: String,
    /// The resources (often the very layers the snapshot holds).
    pub resources: TypedResources,
}

impl AdsResponse {
    /// Names of the resources, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .resources
            .iter()
            .map(|r| r.name().to_string())
            .collect();
        names.sort();
        names
    }

    /// The encoded `resources` entries, layer by layer.
    pub fn entries(&self) -> impl Iterator<Item = &Bytes> {
        self.resources.iter().map(Resource::entry)
    }
}

/// What a request meant for its type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestEvent {
    /// First request for a type on this stream.
    Subscribe,
    /// The proxy accepted the response with this version.
    Ack {
        /// The accepted version.
        version: Version,
    },
    /// The proxy rejected a response; it keeps its last good config.
    Nack(Nack),
    /// Same nonce as the last response, with other resource names.
    SubscriptionChanged,
    /// A response to an older nonce: superseded, ignored.
    Stale,
}

/// A rejected response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nack {
    /// Version the proxy rejected.
    pub version: Version,
    /// Nonce of the rejected response.
    pub nonce: String,
    /// Envoy's error message.
    pub message: String,
}

#[derive(Clone, Debug, Default)]
struct Sent {
    version: Version,
    nonce: String,
    resources: TypedResources,
}

#[derive(Clone, Debug, Default)]
struct TypeState {
    names: BTreeSet<String>,
    wildcard: bool,
    /// A request is waiting for a response even if content is unchanged.
    must_respond: bool,
    sent: Option<Sent>,
    /// When the version in `sent` was first sent.
    sent_at: Option<SystemTime>,
    responses: u64,
    acked_version: Option<Version>,
    /// When the proxy first ACKed `acked_version`.
    acked_at: Option<SystemTime>,
    nack: Option<Nack>,
}

/// Sync state of one type on one stream, for `proxy-status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TypeSync {
    /// Short type name (`CDS`, ...).
    pub type_name: &'static str,
    /// Version of the last response sent.
    pub sent_version: Option<Version>,
    /// Version the proxy last ACKed.
    pub acked_version: Option<Version>,
    /// Number of resources in the last response.
    pub sent_resources: usize,
    /// Responses sent for this type on this stream (a NACK loop would show here).
    pub responses: u64,
    /// The last NACK (cleared by the next ACK).
    pub last_nack: Option<Nack>,
    /// When the current sent version was first sent.
    pub sent_at: Option<SystemTime>,
    /// When the proxy first ACKed its current acked version.
    pub acked_at: Option<SystemTime>,
}

/// The ADS state machine of one stream.
#[derive(Debug, Default)]
pub struct AdsConnection {
    node_id: Option<String>,
    types: BTreeMap<String, TypeState>,
    nonce_seq: u64,
}

impl AdsConnection {
    /// A connection that has seen no request yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Node id from the first request that carried one.
    pub fn node_id(&self) -> Option<&str> {
        self.node_id.as_deref()
    }

    /// Applies one request from the proxy.
    pub fn on_request(&mut self, req: &DiscoveryRequest) -> Result<RequestEvent, XdsError> {
        remember_node(&mut self.node_id, &req.type_url, req.node.as_ref())?;
        let is_new = !self.types.contains_key(&req.type_url);
        let state = self.types.entry(req.type_url.clone()).or_default();
        let last_nonce = state.sent.as_ref().map(|s| s.nonce.as_str());
        if !req.response_nonce.is_empty() && Some(req.response_nonce.as_str()) != last_nonce {
            return Ok(RequestEvent::Stale);
        }
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let wildcard =
            type_url::is_wildcard_type(&req.type_url) && (names.is_empty() || names.contains("*"));
        let names_changed = names != state.names || wildcard != state.wildcard;
        state.names = names;
        state.wildcard = wildcard;

        if req.response_nonce.is_empty() {
            // A new subscription, or a reconnect after a control-plane restart: always answer.
            state.must_respond = names_changed;
            return Ok(RequestEvent::Subscribe);
        }
        if let Some(status) = &req.error_detail {
            let nack = Nack {
                version: state
                    .sent
                    .as_ref()
                    .map(|s| s.version.clone())
                    .unwrap_or_default(),
                nonce: req.response_nonce.clone(),
                message: status.message.clone(),
            };
            state.nack = Some(nack.clone());
            // Only a subscription change earns a response; the rejected content is not re-sent.
            state.must_respond = names_changed;
            return Ok(RequestEvent::Nack(nack));
        }
        let version = Version::from(req.version_info.as_str());
        record_ack(&mut state.acked_version, &mut state.acked_at, &version);
        state.nack = None;
        if names_changed && !is_new {
            state.must_respond = names_changed;
            return Ok(RequestEvent::SubscriptionChanged);
        }
        Ok(RequestEvent::Ack { version })
    }

    /// Responses that bring the proxy to `snapshot`, in make-before-break order:
    /// additions in CDS, EDS, SDS, LDS, RDS order first, then the removals.
    pub fn next_responses(&mut self, snapshot: &Snapshot) -> Vec<AdsResponse> {
        let ordered = type_url::in_push_order(self.types.keys());

        let mut out = Vec::new();
        let mut removals = Vec::new();
        // Whether a cluster the proxy had changes: the new version warms until its
        // endpoints come, so the endpoints go out again even when they did not change.
        let mut rewarm = false;
        for type_url in ordered {
            let Some(state) = self.types.get(&type_url) else {
                continue;
            };
            let (desired, version) =
                desired_resources(state.wildcard, &state.names, snapshot.resources(&type_url));
            let unchanged = state.sent.as_ref().map(|s| &*s.version) == Some(&*version);
            let again = rewarm && type_url == type_url::ENDPOINT;
            if unchanged && !state.must_respond && !again {
                continue;
            }
            if type_url == type_url::CLUSTER
                && let Some(sent) = &state.sent
            {
                rewarm = desired.iter().any(|r| {
                    sent.resources
                        .get(r.name())
                        .is_some_and(|old| old.version() != r.version())
                });
            }
            let removed: Vec<Resource> = state
                .sent
                .iter()
                .flat_map(|s| s.resources.iter())
                .filter(|r| !desired.contains(r.name()))
                .cloned()
                .collect();
            if removed.is_empty() {
                out.push(self.respond(&type_url, desired, version));
                continue;
            }
            // Keep removed resources until everything that referenced them has moved on.
            let mut layers = desired.layers().to_vec();
            layers.push(Arc::new(Layer::new(removed)));
            let union = TypedResources::from_layers(layers);
            let union_version = union.shared_version();
            if state.sent.as_ref().map(|s| &*s.version) != Some(&*union_version) {
                out.push(self.respond(&type_url, union, union_version));
            }
            removals.push((type_url, desired, version));
        }
        for (type_url, desired, version) in removals {
            out.push(self.respond(&type_url, desired, version));
        }
        out
    }

    fn respond(
        &mut self,
        type_url: &str,
        resources: TypedResources,
        version_info: Version,
    ) -> AdsResponse {
        self.nonce_seq += 1;
        let nonce = self.nonce_seq.to_string();
        let response = AdsResponse {
            version_info: version_info.clone(),
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            resources: resources.clone(),
        };
        let state = self.types.entry(type_url.to_string()).or_default();
        state.must_respond = false;
        state.responses += 1;
        if state.sent.as_ref().map(|s| &*s.version) != Some(&*version_info) {
            state.sent_at = Some(SystemTime::now());
        }
        state.sent = Some(Sent {
            version: version_info,
            nonce,
            resources,
        });
        response
    }

    /// What the proxy was sent last, per type (during a removal, the union it holds
    /// until the removal goes out).
    pub fn served(&self) -> Served {
        let views = Snapshot::from_views(self.types.iter().filter_map(|(t, s)| {
            s.sent
                .as_ref()
                .map(|sent| (t.as_str(), sent.resources.clone()))
        }));
        Served::new(views, Vec::new())
    }

    /// Per-type sync state, in push order.
    pub fn sync_state(&self) -> Vec<TypeSync> {
        self.types
            .iter()
            .map(|(t, s)| TypeSync {
                type_name: type_url::short_name(t),
                sent_version: s.sent.as_ref().map(|x| x.version.clone()),
                acked_version: s.acked_version.clone(),
                sent_resources: s.sent.as_ref().map_or(0, |x| x.resources.len()),
                responses: s.responses,
                last_nack: s.nack.clone(),
                sent_at: s.sent_at,
                acked_at: s.acked_at,
            })
            .collect()
    }
}

/// Records an ACK of `version`, stamping the time when it is a new one.
pub(crate) fn record_ack(
    acked_version: &mut Option<Version>,
    acked_at: &mut Option<SystemTime>,
    version: &Version,
) {
    if acked_version.as_deref() != Some(&**version) {
        *acked_version = Some(version.clone());
        *acked_at = Some(SystemTime::now());
    }
}

/// Checks what every ADS request must carry, and takes the node id from the first
/// request that has one (Envoy may send it on the first message only).
pub(crate) fn remember_node(
    node_id: &mut Option<String>,
    type_url: &str,
    node: Option<&Node>,
) -> Result<(), XdsError> {
    if type_url.is_empty() {
        return Err(XdsError::MissingTypeUrl);
    }
    if node_id.is_none() {
        match node.map(|n| n.id.as_str()) {
            Some(id) if !id.is_empty() => *node_id = Some(id.to_string()),
            _ => return Err(XdsError::MissingNode),
        }
    }
    Ok(())
}

/// What a subscription wants from what is available, and that set's version.
/// Shares the snapshot's layers when the subscription covers all of them (the usual case).
pub(crate) fn desired_resources<N: std::borrow::Borrow<str> + Ord>(
    wildcard: bool,
    names: &BTreeSet<N>,
    available: Option<&TypedResources>,
) -> (TypedResources, Version) {
    let Some(available) = available else {
        let empty = TypedResources::default();
        let version = empty.shared_version();
        return (empty, version);
    };
    // Fewer names than resources cannot cover them all (no walk for a proxy that
    // subscribes to a few names of a mesh-wide view).
    let may_cover = names.len() >= available.len();
    if wildcard || (may_cover && available.iter().all(|r| names.contains(r.name()))) {
        return (available.clone(), available.shared_version());
    }
    let subset = names
        .iter()
        .filter_map(|n| available.get(n.borrow()).cloned());
    let view = TypedResources::single(Arc::new(Layer::new(subset)));
    let version = view.shared_version();
    (view, version)
}
