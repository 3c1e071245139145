//! Input objects by kind, with the lookups resolution needs kept up to date as they
//! come and go: pods by label, IP and service account, services and slices by the
//! service they belong to. Every lookup costs what it returns, not the size of the mesh.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use weft_crds::TrafficPolicy;
use weft_crds::gateway::{GRPCRoute, ReferenceGrant};
use weft_crds::{HTTPRoute, HTTPRouteGroup, MeshConfig, TCPRoute, TrafficSplit, TrafficTarget};

use super::few_set::{FewSet, add, remove};
use super::{Kind, MeshObject, MeshPod, ObjectRef};

/// Namespace and name of a namespaced object.
pub(super) type Key = (String, String);

/// The label on an EndpointSlice naming its Service.
pub(super) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

pub(super) fn ns(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

pub(super) fn name(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

pub(super) fn key_of(meta: &ObjectMeta) -> Key {
    (ns(meta).to_string(), name(meta).to_string())
}

/// Whether `svc`'s selector picks `pod`: same namespace, non-empty selector, all labels.
pub(super) fn selects(svc: &Service, pod: &MeshPod) -> bool {
    if ns(&svc.metadata) != ns(&pod.metadata) {
        return false;
    }
    let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    !selector.is_empty()
        && selector
            .iter()
            .all(|(k, v)| pod.label(k) == Some(v.as_str()))
}

fn slice_service(slice: &EndpointSlice) -> Option<Key> {
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((ns(&slice.metadata).to_string(), service.clone()))
}

/// Every input object, by kind and namespace/name, with secondary lookups.
#[derive(Clone, Debug, Default)]
pub(super) struct Store {
    pub services: BTreeMap<Key, Arc<Service>>,
    pub pods: BTreeMap<Key, Arc<MeshPod>>,
    pub slices: BTreeMap<Key, Arc<EndpointSlice>>,
    pub splits: BTreeMap<Key, Arc<TrafficSplit>>,
    pub targets: BTreeMap<Key, Arc<TrafficTarget>>,
    pub route_groups: BTreeMap<Key, Arc<HTTPRouteGroup>>,
    pub tcp_routes: BTreeMap<Key, Arc<TCPRoute>>,
    pub service_accounts: BTreeMap<Key, Arc<ServiceAccount>>,
    pub mesh_configs: BTreeMap<String, Arc<MeshConfig>>,
    pub http_routes: BTreeMap<Key, Arc<HTTPRoute>>,
    pub grpc_routes: BTreeMap<Key, Arc<GRPCRoute>>,
    pub reference_grants: BTreeMap<Key, Arc<ReferenceGrant>>,
    pub traffic_policies: BTreeMap<Key, Arc<TrafficPolicy>>,
    /// (namespace, label key, label value) → pod names.
    pods_by_label: HashMap<(String, String, String), FewSet<String>>,
    /// Namespace → pod names.
    pods_by_ns: HashMap<String, FewSet<String>>,
    /// Pod IP → pods (two only while one replaces the other).
    pods_by_ip: HashMap<IpAddr, FewSet<Key>>,
    /// (namespace, service account) → pod names.
    pods_by_account: HashMap<Key, FewSet<String>>,
    /// Namespace → service names.
    services_by_ns: HashMap<String, FewSet<String>>,
    /// Service → names of its EndpointSlices.
    slices_by_service: HashMap<Key, FewSet<String>>,
}

impl Store {
    /// Stores `object`, replacing one of the same kind and name; returns the one replaced.
    pub fn insert(&mut self, object: MeshObject) -> Option<MeshObject> {
        let old = self.remove(&object.object_ref());
        match object {
            MeshObject::Service(s) => {
                let key = key_of(&s.metadata);
                add(&mut self.services_by_ns, key.0.clone(), key.1.clone());
                self.services.insert(key, s);
            }
            MeshObject::Pod(p) => {
                let key = key_of(&p.metadata);
                for (k, v) in &p.labels {
                    add(
                        &mut self.pods_by_label,
                        (key.0.clone(), k.clone(), v.clone()),
                        key.1.clone(),
                    );
                }
                add(&mut self.pods_by_ns, key.0.clone(), key.1.clone());
                for ip in &p.ips {
                    add(&mut self.pods_by_ip, *ip, key.clone());
                }
                add(
                    &mut self.pods_by_account,
                    (key.0.clone(), p.service_account.clone()),
                    key.1.clone(),
                );
                self.pods.insert(key, p);
            }
            MeshObject::EndpointSlice(e) => {
                let key = key_of(&e.metadata);
                if let Some(service) = slice_service(&e) {
                    add(&mut self.slices_by_service, service, key.1.clone());
                }
                self.slices.insert(key, e);
            }
            MeshObject::TrafficSplit(o) => {
                self.splits.insert(key_of(&o.metadata), o);
            }
            MeshObject::TrafficTarget(o) => {
                self.targets.insert(key_of(&o.metadata), o);
            }
            MeshObject::HTTPRouteGroup(o) => {
                self.route_groups.insert(key_of(&o.metadata), o);
            }
            MeshObject::TCPRoute(o) => {
                self.tcp_routes.insert(key_of(&o.metadata), o);
            }
            MeshObject::ServiceAccount(o) => {
                self.service_accounts.insert(key_of(&o.metadata), o);
            }
            MeshObject::MeshConfig(o) => {
                self.mesh_configs.insert(name(&o.metadata).to_string(), o);
            }
            MeshObject::HTTPRoute(o) => {
                self.http_routes.insert(key_of(&o.metadata), o);
            }
            MeshObject::GRPCRoute(o) => {
                self.grpc_routes.insert(key_of(&o.metadata), o);
            }
            MeshObject::ReferenceGrant(o) => {
                self.reference_grants.insert(key_of(&o.metadata), o);
            }
            MeshObject::TrafficPolicy(o) => {
                self.traffic_policies.insert(key_of(&o.metadata), o);
            }
        }
        old
    }

    /// Removes the object `key` names; returns it.
    pub fn remove(&mut self, key: &ObjectRef) -> Option<MeshObject> {
        let k = (key.namespace.clone(), key.name.clone());
        Some(match key.kind {
            Kind::Service => {
                let s = self.services.remove(&k)?;
                remove(&mut self.services_by_ns, k.0.clone(), &k.1);
                MeshObject::Service(s)
            }
            Kind::Pod => {
                let p = self.pods.remove(&k)?;
                for (lk, lv) in &p.labels {
                    remove(
                        &mut self.pods_by_label,
                        (k.0.clone(), lk.clone(), lv.clone()),
                        &k.1,
                    );
                }
                remove(&mut self.pods_by_ns, k.0.clone(), &k.1);
                for ip in &p.ips {
                    remove(&mut self.pods_by_ip, *ip, &k);
                }
                remove(
                    &mut self.pods_by_account,
                    (k.0.clone(), p.service_account.clone()),
                    &k.1,
                );
                MeshObject::Pod(p)
            }
            Kind::EndpointSlice => {
                let e = self.slices.remove(&k)?;
                if let Some(service) = slice_service(&e) {
                    remove(&mut self.slices_by_service, service, &k.1);
                }
                MeshObject::EndpointSlice(e)
            }
            Kind::TrafficSplit => MeshObject::TrafficSplit(self.splits.remove(&k)?),
            Kind::TrafficTarget => MeshObject::TrafficTarget(self.targets.remove(&k)?),
            Kind::HTTPRouteGroup => MeshObject::HTTPRouteGroup(self.route_groups.remove(&k)?),
            Kind::TCPRoute => MeshObject::TCPRoute(self.tcp_routes.remove(&k)?),
            Kind::ServiceAccount => MeshObject::ServiceAccount(self.service_accounts.remove(&k)?),
            Kind::MeshConfig => MeshObject::MeshConfig(self.mesh_configs.remove(&k.1)?),
            Kind::HTTPRoute => MeshObject::HTTPRoute(self.http_routes.remove(&k)?),
            Kind::GRPCRoute => MeshObject::GRPCRoute(self.grpc_routes.remove(&k)?),
            Kind::TrafficPolicy => MeshObject::TrafficPolicy(self.traffic_policies.remove(&k)?),
            Kind::ReferenceGrant => MeshObject::ReferenceGrant(self.reference_grants.remove(&k)?),
        })
    }

    /// Whether an object equal to `object` is stored (compared without cloning).
    pub fn holds(&self, object: &MeshObject) -> bool {
        let key = object.object_ref();
        let k = (key.namespace.clone(), key.name.clone());
        match object {
            MeshObject::Service(o) => self.services.get(&k) == Some(o),
            MeshObject::Pod(o) => self.pods.get(&k) == Some(o),
            MeshObject::EndpointSlice(o) => self.slices.get(&k) == Some(o),
            MeshObject::TrafficSplit(o) => self.splits.get(&k) == Some(o),
            MeshObject::TrafficTarget(o) => self.targets.get(&k) == Some(o),
            MeshObject::HTTPRouteGroup(o) => self.route_groups.get(&k) == Some(o),
            MeshObject::TCPRoute(o) => self.tcp_routes.get(&k) == Some(o),
            MeshObject::ServiceAccount(o) => self.service_accounts.get(&k) == Some(o),
            MeshObject::MeshConfig(o) => self.mesh_configs.get(&k.1) == Some(o),
            MeshObject::HTTPRoute(o) => self.http_routes.get(&k) == Some(o),
            MeshObject::GRPCRoute(o) => self.grpc_routes.get(&k) == Some(o),
            MeshObject::ReferenceGrant(o) => self.reference_grants.get(&k) == Some(o),
            MeshObject::TrafficPolicy(o) => self.traffic_policies.get(&k) == Some(o),
        }
    }

    /// References of every stored object.
    pub fn refs(&self) -> BTreeSet<ObjectRef> {
        let named = |kind: Kind, keys: &mut dyn Iterator<Item = &Key>| {
            keys.map(|(n, m)| ObjectRef::new(kind, n, m))
                .collect::<Vec<_>>()
        };
        let mut out = BTreeSet::new();
        out.extend(named(Kind::Service, &mut self.services.keys()));
        out.extend(named(Kind::Pod, &mut self.pods.keys()));
        out.extend(named(Kind::EndpointSlice, &mut self.slices.keys()));
        out.extend(named(Kind::TrafficSplit, &mut self.splits.keys()));
        out.extend(named(Kind::TrafficTarget, &mut self.targets.keys()));
        out.extend(named(Kind::HTTPRouteGroup, &mut self.route_groups.keys()));
        out.extend(named(Kind::TCPRoute, &mut self.tcp_routes.keys()));
        out.extend(named(Kind::HTTPRoute, &mut self.http_routes.keys()));
        out.extend(named(Kind::GRPCRoute, &mut self.grpc_routes.keys()));
        out.extend(named(
            Kind::ReferenceGrant,
            &mut self.reference_grants.keys(),
        ));
        out.extend(named(
            Kind::TrafficPolicy,
            &mut self.traffic_policies.keys(),
        ));
        out.extend(named(
            Kind::ServiceAccount,
            &mut self.service_accounts.keys(),
        ));
        out.extend(
            self.mesh_configs
                .keys()
                .map(|n| ObjectRef::new(Kind::MeshConfig, "", n)),
        );
        out
    }

    /// Number of objects.
    pub fn len(&self) -> usize {
        self.services.len()
            + self.pods.len()
            + self.slices.len()
            + self.splits.len()
            + self.targets.len()
            + self.route_groups.len()
            + self.tcp_routes.len()
            + self.service_accounts.len()
            + self.mesh_configs.len()
            + self.http_routes.len()
            + self.grpc_routes.len()
            + self.reference_grants.len()
            + self.traffic_policies.len()
    }

    /// Every object, cloned (for a full rebuild elsewhere).
    pub fn objects(&self) -> Vec<MeshObject> {
        let mut out: Vec<MeshObject> = Vec::with_capacity(self.len());
        out.extend(
            self.services
                .values()
                .map(|o| MeshObject::Service(o.clone())),
        );
        out.extend(self.pods.values().map(|o| MeshObject::Pod(o.clone())));
        out.extend(
            self.slices
                .values()
                .map(|o| MeshObject::EndpointSlice(o.clone())),
        );
        out.extend(
            self.splits
                .values()
                .map(|o| MeshObject::TrafficSplit(o.clone())),
        );
        out.extend(
            self.targets
                .values()
                .map(|o| MeshObject::TrafficTarget(o.clone())),
        );
        out.extend(
            self.route_groups
                .values()
                .map(|o| MeshObject::HTTPRouteGroup(o.clone())),
        );
        out.extend(
            self.tcp_routes
                .values()
                .map(|o| MeshObject::TCPRoute(o.clone())),
        );
        out.extend(
            self.service_accounts
                .values()
                .map(|o| MeshObject::ServiceAccount(o.clone())),
        );
        out.extend(
            self.mesh_configs
                .values()
                .map(|o| MeshObject::MeshConfig(o.clone())),
        );
        out.extend(
            self.http_routes
                .values()
                .map(|o| MeshObject::HTTPRoute(o.clone())),
        );
        out.extend(
            self.grpc_routes
                .values()
                .map(|o| MeshObject::GRPCRoute(o.clone())),
        );
        out.extend(
            self.reference_grants
                .values()
                .map(|o| MeshObject::ReferenceGrant(o.clone())),
        );
        out.extend(
            self.traffic_policies
                .values()
                .map(|o| MeshObject::TrafficPolicy(o.clone())),
        );
        out
    }

    /// The pods `svc` selects, via the smallest label set of its selector.
    pub fn selected_pods(&self, svc: &Service) -> Vec<&MeshPod> {
        let namespace = ns(&svc.metadata).to_string();
        let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
            return Vec::new();
        };
        let smallest = selector
            .iter()
            .map(|(k, v)| {
                self.pods_by_label
                    .get(&(namespace.clone(), k.clone(), v.clone()))
            })
            .min_by_key(|set| set.map_or(0, FewSet::len));
        let Some(Some(candidates)) = smallest else {
            return Vec::new();
        };
        candidates
            .iter()
            .filter_map(|n| self.pods.get(&(namespace.clone(), n.clone())))
            .map(|p| &**p)
            .filter(|p| selects(svc, p))
            .collect()
    }

    /// The services of the pod's namespace whose selector picks it.
    pub fn services_selecting(&self, pod: &MeshPod) -> Vec<&Service> {
        let namespace = ns(&pod.metadata);
        self.services_by_ns
            .get(namespace)
            .into_iter()
            .flatten()
            .filter_map(|n| self.services.get(&(namespace.to_string(), n.clone())))
            .map(|s| &**s)
            .filter(|s| selects(s, pod))
            .collect()
    }

    /// The EndpointSlices of a service.
    pub fn slices_of(&self, service: &Key) -> Vec<&EndpointSlice> {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|n| self.slices.get(&(service.0.clone(), n.clone())))
            .map(|s| &**s)
            .collect()
    }

    /// The pods with this IP.
    pub fn pods_at(&self, ip: IpAddr) -> Vec<&MeshPod> {
        self.pods_by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .filter_map(|k| self.pods.get(k))
            .map(|p| &**p)
            .collect()
    }

    /// The pods running as a service account.
    pub fn pods_running_as(&self, account: &Key) -> Vec<Key> {
        self.pods_by_account
            .get(account)
            .into_iter()
            .flatten()
            .map(|n| (account.0.clone(), n.clone()))
            .collect()
    }

    /// Whether a service account exists: as an object, run by a pod, or `default`
    /// (the API server creates it in every namespace).
    pub fn account_exists(&self, account: &Key) -> bool {
        account.1 == "default"
            || self.service_accounts.contains_key(account)
            || self.pods_by_account.contains_key(account)
    }
}
