//! The index: every input object by kind and namespace/name, resolved into a
//! validated [`MeshModel`]. Plain synchronous code; no I/O.

mod access;
mod model;
mod protocol;
mod resolve;

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use weft_crds::{HTTPRouteGroup, MeshConfig, TCPRoute, TrafficSplit, TrafficTarget};

pub use model::{
    AccessGrant, AppProtocol, HttpRequestMatch, MeshModel, MeshService, MeshSettings, ProbeForward,
    Problem, ProtocolSource, ServiceKey, ServicePortModel, SplitBackend, SplitModel, TcpGrant,
    Workload, WorkloadPort,
};
pub use protocol::{DEFAULT_OPAQUE_PORTS, select_protocol};
pub use resolve::parse_gateway_duration;

/// The kinds of object the index understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// core/v1 Service.
    Service,
    /// core/v1 Pod.
    Pod,
    /// discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice,
    /// split.smi-spec.io TrafficSplit.
    TrafficSplit,
    /// access.smi-spec.io TrafficTarget.
    TrafficTarget,
    /// specs.smi-spec.io HTTPRouteGroup.
    HTTPRouteGroup,
    /// specs.smi-spec.io TCPRoute.
    TCPRoute,
    /// core/v1 ServiceAccount.
    ServiceAccount,
    /// config.weft.dev MeshConfig (cluster-scoped).
    MeshConfig,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Kind plus namespace/name: the identity of an input object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ObjectRef {
    /// The object's kind.
    #[serde(serialize_with = "serialize_display")]
    pub kind: Kind,
    /// Namespace (`default` when the manifest gives none).
    pub namespace: String,
    /// Name.
    pub name: String,
}

fn serialize_display<S: serde::Serializer>(k: &Kind, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(k)
}

impl ObjectRef {
    /// A reference from parts.
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        Self {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            // Cluster-scoped.
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One input object of any supported kind.
#[derive(Clone, Debug, PartialEq)]
pub enum MeshObject {
    /// A Service.
    Service(Box<Service>),
    /// A Pod.
    Pod(Box<Pod>),
    /// An EndpointSlice.
    EndpointSlice(Box<EndpointSlice>),
    /// A TrafficSplit.
    TrafficSplit(Box<TrafficSplit>),
    /// A TrafficTarget.
    TrafficTarget(Box<TrafficTarget>),
    /// An HTTPRouteGroup.
    HTTPRouteGroup(Box<HTTPRouteGroup>),
    /// A TCPRoute.
    TCPRoute(Box<TCPRoute>),
    /// A ServiceAccount.
    ServiceAccount(Box<ServiceAccount>),
    /// The mesh-wide settings.
    MeshConfig(Box<MeshConfig>),
}

impl MeshObject {
    fn meta(&self) -> &ObjectMeta {
        match self {
            Self::Service(o) => &o.metadata,
            Self::Pod(o) => &o.metadata,
            Self::EndpointSlice(o) => &o.metadata,
            Self::TrafficSplit(o) => &o.metadata,
            Self::TrafficTarget(o) => &o.metadata,
            Self::HTTPRouteGroup(o) => &o.metadata,
            Self::TCPRoute(o) => &o.metadata,
            Self::ServiceAccount(o) => &o.metadata,
            Self::MeshConfig(o) => &o.metadata,
        }
    }

    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Service(_) => Kind::Service,
            Self::Pod(_) => Kind::Pod,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
            Self::TrafficSplit(_) => Kind::TrafficSplit,
            Self::TrafficTarget(_) => Kind::TrafficTarget,
            Self::HTTPRouteGroup(_) => Kind::HTTPRouteGroup,
            Self::TCPRoute(_) => Kind::TCPRoute,
            Self::ServiceAccount(_) => Kind::ServiceAccount,
            Self::MeshConfig(_) => Kind::MeshConfig,
        }
    }

    /// Kind, namespace (defaulted; empty for cluster-scoped kinds) and name.
    pub fn object_ref(&self) -> ObjectRef {
        let meta = self.meta();
        let namespace = match self {
            Self::MeshConfig(_) => "",
            _ => meta.namespace.as_deref().unwrap_or("default"),
        };
        ObjectRef::new(
            self.kind(),
            namespace,
            meta.name.as_deref().unwrap_or_default(),
        )
    }
}

/// All input objects, keyed by [`ObjectRef`]. Sources call `apply`, `delete` and `reset`.
#[derive(Clone, Debug, Default)]
pub struct Index {
    objects: BTreeMap<ObjectRef, MeshObject>,
}

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces an object; returns whether anything changed.
    pub fn apply(&mut self, object: MeshObject) -> bool {
        let key = object.object_ref();
        if self.objects.get(&key) == Some(&object) {
            return false;
        }
        self.objects.insert(key, object);
        true
    }

    /// Removes an object; returns whether it was there.
    pub fn delete(&mut self, key: &ObjectRef) -> bool {
        self.objects.remove(key).is_some()
    }

    /// Replaces every object (a full relist); returns whether anything changed.
    pub fn reset(&mut self, objects: impl IntoIterator<Item = MeshObject>) -> bool {
        let next: BTreeMap<ObjectRef, MeshObject> =
            objects.into_iter().map(|o| (o.object_ref(), o)).collect();
        if next == self.objects {
            return false;
        }
        self.objects = next;
        true
    }

    /// Number of objects held.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether the index holds nothing.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Resolves references and validates everything into a mesh model.
    pub fn model(&self) -> MeshModel {
        resolve::resolve(self.objects.values())
    }
}
