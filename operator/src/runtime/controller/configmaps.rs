//! What injected sidecars mount, as ConfigMaps in every namespace with meshed pods: the
//! trust bundle (`weft-root-ca`) and the Envoy bootstrap (`weft-bootstrap`), written by
//! the leader and rewritten when someone changes or deletes them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;

use crate::error::WeftError;
use crate::index::{Index, Kind, ModelDelta};
use crate::runtime::controller::lease::Leadership;
use crate::runtime::controller::status::FIELD_MANAGER;
use crate::runtime::mesh::ModelObserver;
use crate::runtime::metrics::ControlPlaneMetrics;
use crate::sources::kube::LiveNamespaces;

/// Name of the trust bundle ConfigMap (the sidecar mounts it at /etc/weft/ca).
pub const TRUST_BUNDLE_CONFIGMAP: &str = "weft-root-ca";
/// Its key holding the PEM roots.
pub const TRUST_BUNDLE_KEY: &str = "ca.crt";
/// Name of the bootstrap ConfigMap (the sidecar mounts it at /etc/weft/bootstrap).
pub const BOOTSTRAP_CONFIGMAP: &str = "weft-bootstrap";
/// Its key holding Envoy's bootstrap.
pub const BOOTSTRAP_KEY: &str = "envoy.yaml";
/// The label on every ConfigMap Weft publishes (and watches to keep them current).
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "weft");

/// One ConfigMap published into every namespace with meshed pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedConfigMap {
    /// Its name.
    pub name: &'static str,
    /// Its data.
    pub data: BTreeMap<String, String>,
}

/// Namespaces with meshed pods, kept current one changed workload at a time.
#[derive(Debug)]
pub struct MeshedNamespaces {
    /// Meshed node id → its namespace.
    nodes: HashMap<String, String>,
    /// Namespace → meshed pods in it.
    counts: BTreeMap<String, usize>,
    out: watch::Sender<Arc<BTreeSet<String>>>,
}

impl MeshedNamespaces {
    /// An observer and the receiver of its namespace set.
    pub fn new() -> (Self, watch::Receiver<Arc<BTreeSet<String>>>) {
        let (out, rx) = watch::channel(Arc::default());
        let observer = Self {
            nodes: HashMap::new(),
            counts: BTreeMap::new(),
            out,
        };
        (observer, rx)
    }

    fn forget(&mut self, node: &str) {
        if let Some(ns) = self.nodes.remove(node)
            && let Some(n) = self.counts.get_mut(&ns)
        {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&ns);
            }
        }
    }
}

impl ModelObserver for MeshedNamespaces {
    fn applied(&mut self, index: &Index, delta: &ModelDelta, touched: Option<&BTreeSet<Kind>>) {
        let workloads = &index.model().workloads;
        let changed: Vec<String> = if touched.is_none() {
            // A full reset: start over from every workload.
            self.nodes.clear();
            self.counts.clear();
            workloads.keys().cloned().collect()
        } else {
            delta.workloads.iter().cloned().collect()
        };
        for node in changed {
            self.forget(&node);
            if let Some(w) = workloads.get(&node).filter(|w| w.meshed) {
                self.nodes.insert(node, w.namespace.clone());
                *self.counts.entry(w.namespace.clone()).or_default() += 1;
            }
        }
        let namespaces: BTreeSet<String> = self.counts.keys().cloned().collect();
        self.out.send_if_modified(|current| {
            if **current == namespaces {
                return false;
            }
            *current = Arc::new(namespaces);
            true
        });
    }
}

/// Writes the ConfigMaps while this replica leads.
pub struct ConfigMapPublisher {
    client: Client,
    maps: Vec<PublishedConfigMap>,
    meshed: watch::Receiver<Arc<BTreeSet<String>>>,
    live: watch::Receiver<Arc<LiveNamespaces>>,
    leadership: Leadership,
    metrics: Arc<ControlPlaneMetrics>,
    /// (namespace, name) of the ConfigMaps that hold what they should (as written, or
    /// as seen).
    current: BTreeSet<(String, &'static str)>,
}

impl std::fmt::Debug for ConfigMapPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigMapPublisher")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

const RETRY: Duration = Duration::from_secs(2);

impl ConfigMapPublisher {
    /// A publisher of `maps` into the `live` namespaces (existing, not being deleted)
    /// that have meshed pods or are labelled for injection (a pod's first proxy needs
    /// them before the pod exists).
    pub fn new(
        client: Client,
        maps: Vec<PublishedConfigMap>,
        meshed: watch::Receiver<Arc<BTreeSet<String>>>,
        live: watch::Receiver<Arc<LiveNamespaces>>,
        leadership: Leadership,
        metrics: Arc<ControlPlaneMetrics>,
    ) -> Self {
        Self {
            client,
            maps,
            meshed,
            live,
            leadership,
            metrics,
            current: BTreeSet::new(),
        }
    }

    async fn write(&self, namespace: &str, map: &PublishedConfigMap) -> Result<(), kube::Error> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let body = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": map.name,
                "namespace": namespace,
                "labels": { MANAGED_BY.0: MANAGED_BY.1 },
            },
            "data": map.data,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch(map.name, &params, &Patch::Apply(&body))
            .await
            .map(|_| ())
    }

    /// Whether a ConfigMap seen in the cluster holds what Weft publishes under its name.
    fn holds(&self, cm: &ConfigMap) -> Option<(String, &'static str)> {
        let name = cm.metadata.name.as_deref()?;
        let map = self.maps.iter().find(|m| m.name == name)?;
        let namespace = cm.metadata.namespace.clone()?;
        (cm.data.as_ref() == Some(&map.data)).then_some((namespace, map.name))
    }

    /// Forgets a ConfigMap that changed or went away, so it is written again.
    fn forget(&mut self, cm: &ConfigMap) {
        if let (Some(ns), Some(name)) = (&cm.metadata.namespace, &cm.metadata.name) {
            self.current
                .retain(|(n, m)| !(n == ns && *m == name.as_str()));
        }
    }

    /// Writes what is missing; whether a write failed.
    async fn reconcile(&mut self) -> bool {
        let wanted: Vec<(String, usize)> = {
            let meshed = self.meshed.borrow_and_update().clone();
            let live = self.live.borrow_and_update().clone();
            live.iter()
                .filter(|(ns, injection)| **injection || meshed.contains(*ns))
                .map(|(ns, _)| ns)
                .flat_map(|ns| (0..self.maps.len()).map(move |i| (ns.clone(), i)))
                .filter(|(ns, i)| !self.current.contains(&(ns.clone(), self.maps[*i].name)))
                .collect()
        };
        let mut failed = false;
        for (namespace, i) in wanted {
            if !self.leadership.is_leader() {
                return false;
            }
            let map = &self.maps[i];
            match self.write(&namespace, map).await {
                Ok(()) => {
                    tracing::info!(%namespace, configmap = map.name, "ConfigMap written");
                    self.current.insert((namespace, map.name));
                }
                Err(error) => {
                    failed = true;
                    self.metrics.reconcile_errors.inc();
                    tracing::warn!(%error, %namespace, configmap = map.name, "writing the ConfigMap failed; retrying");
                }
            }
        }
        failed
    }

    /// Publishes while leading, forever; a ConfigMap changed or deleted by someone else
    /// is written again.
    pub async fn run(mut self) -> Result<(), WeftError> {
        let api: Api<ConfigMap> = Api::all(self.client.clone());
        let config =
            watcher::Config::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
        let mut seen = watcher(api, config).default_backoff().boxed();
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            if self.leadership.is_leader() {
                let failed = self.reconcile().await;
                retry_at = failed.then(|| tokio::time::Instant::now() + RETRY);
            }
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = self.meshed.changed() => if r.is_err() {
                    return Err(WeftError::TaskEnded { task: "sidecar-configmaps", reason: "the mesh task stopped".to_string() });
                },
                r = self.live.changed() => if r.is_err() {
                    return Err(WeftError::TaskEnded { task: "sidecar-configmaps", reason: "the namespace watch stopped".to_string() });
                },
                () = self.leadership.changed() => {}
                () = retry => {}
                event = seen.next() => match event {
                                        Some(Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))) => {
                        match self.holds(&cm) {
                            Some(key) => { self.current.insert(key); }
                            None => self.forget(&cm),
                        }
                    }
                    Some(Ok(watcher::Event::Delete(cm))) => self.forget(&cm),
                    Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
                    Some(Err(error)) => {
                        self.metrics.watch_restarted("ConfigMap");
                        tracing::warn!(%error, "published ConfigMaps watch failed; retrying after a backoff");
                    }
                    None => return Err(WeftError::TaskEnded { task: "sidecar-configmaps", reason: "the ConfigMap watch ended".to_string() }),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::parse_manifests;

    #[test]
    fn namespaces_with_meshed_pods_follow_the_pods() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: shop}\nstatus: {podIP: 10.0.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: plain, labels: {weft.dev/inject: disabled}}\nstatus: {podIP: 10.0.0.2}\n";
        let mut index = Index::new();
        let delta = index
            .reset(parse_manifests(text).unwrap())
            .unwrap_or_default();
        let (mut observer, rx) = MeshedNamespaces::new();
        observer.applied(&index, &delta, None);
        assert_eq!(rx.borrow().iter().collect::<Vec<_>>(), vec!["shop"]);
        let delta = index
            .delete(&crate::index::ObjectRef::new(Kind::Pod, "shop", "a"))
            .unwrap_or_default();
        let pods: BTreeSet<Kind> = [Kind::Pod].into();
        observer.applied(&index, &delta, Some(&pods));
        assert!(rx.borrow().is_empty());
    }
}
