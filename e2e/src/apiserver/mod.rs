//! A Kubernetes API-server double for tests: a real HTTP server speaking the API
//! server's wire protocol, in memory, for the real `kube` client and watcher.
//!
//! It follows the API server where clients depend on it: list pagination over a
//! consistent snapshot, label and field selectors, watches that resume from a
//! resourceVersion or answer an ERROR event with 410 once it is compacted, bookmarks
//! and streaming lists, merge, strategic-merge and JSON patches, server-side apply
//! with field managers and conflicts, status subresources, generation, finalizers,
//! and TokenReview for tokens the test issues. It is plain HTTP with a bearer token:
//! the `kube` client talks to `http://` servers from a kubeconfig.
//!
//! The custom kinds are served in every version their CRDs serve, stored in the stored
//! version and converted as the API server does: through the real conversion webhook
//! when the CRD says so ([`ApiServerDouble::use_conversion_webhook`]; see `conversion`).
//!
//! Simplifications: every kind gets `metadata.generation` (bumped on changes outside
//! metadata and a status subresource); strategic merge patches merge like merge
//! patches (lists are replaced, not merged by key); server-side apply treats lists as
//! atomic; no validation beyond what the code needs; no garbage collection.

mod apply;
mod conversion;
mod http;
mod select;
mod store;
mod tokens;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use conversion::{ConversionWebhook, custom_resource_versions};
pub use store::{ApiError, uuid_shaped};
use store::{KINDS, Store, find_kind};
use tokens::IssuedToken;

/// The audience a TokenReview checks when it names none, as the API server's own.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// State shared by the handle, the connections and the bookmark ticker.
#[derive(Debug)]
pub(crate) struct Shared {
    store: Mutex<Store>,
    /// The bearer token every request must carry.
    token: String,
    /// The conversion webhook, once configured.
    webhook: Mutex<Option<Arc<conversion::Webhook>>>,
    /// The runtime the double serves on (conversions from synchronous callers run here).
    runtime: tokio::runtime::Handle,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic elsewhere must not wedge every later request.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn random_token() -> String {
    store::random_bytes(24)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A running API-server double on 127.0.0.1; stops when dropped.
pub struct ApiServerDouble {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServerDouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServerDouble")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for ApiServerDouble {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A double on a runtime of its own, for tests whose thread blocks (the harness's
/// helpers do): it serves while the test waits. Derefs to the double.
pub struct BackgroundDouble {
    api: ApiServerDouble,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for BackgroundDouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.api.fmt(f)
    }
}

impl std::ops::Deref for BackgroundDouble {
    type Target = ApiServerDouble;
    fn deref(&self) -> &ApiServerDouble {
        &self.api
    }
}

impl BackgroundDouble {
    /// Starts a double on two worker threads of its own.
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let api = runtime.block_on(ApiServerDouble::start())?;
        Ok(Self { api, runtime })
    }

    /// Runs `future` (say, a kube client call) to completion on the double's runtime.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }
}

impl ApiServerDouble {
    /// Starts the double on an ephemeral port of 127.0.0.1. Watches that allow
    /// bookmarks get one every second.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            token: random_token(),
            webhook: Mutex::new(None),
            runtime: tokio::runtime::Handle::current(),
        });
        let ticker = {
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(Duration::from_secs(1));
                loop {
                    interval.tick().await;
                    shared.lock().send_bookmarks();
                }
            })
        };
        let server = tokio::spawn(http::serve(listener, shared.clone()));
        Ok(Self {
            addr,
            shared,
            tasks: vec![server, ticker],
        })
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bearer token requests must carry (the kubeconfig has it).
    pub fn bearer_token(&self) -> &str {
        &self.shared.token
    }

    /// A kubeconfig for the double: one cluster, one token user, namespace `default`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: weft-double\n  cluster:\n    server: {url}\n\
             users:\n- name: weft-double\n  user:\n    token: {token}\n\
             contexts:\n- name: weft-double\n  context:\n    cluster: weft-double\n    user: weft-double\n    namespace: default\n\
             current-context: weft-double\n",
            url = self.url(),
            token = self.shared.token,
        )
    }

    /// Writes [`Self::kubeconfig`] to `path` (for `KUBECONFIG` or a child process).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// A `kube::Client` for the double, built from its kubeconfig.
    pub async fn client(&self) -> Result<kube::Client, kube::Error> {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig())?;
        let options = kube::config::KubeConfigOptions::default();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?;
        kube::Client::try_from(config)
    }

    /// Creates or wholly replaces an object, status included, without HTTP (for
    /// fixtures). Its `apiVersion` and `kind` pick the resource; a namespaced object
    /// without a namespace goes to `default`. Watches see the change. An object in a
    /// custom kind's other served version is converted to the stored one first (and
    /// the stored object returned); through the webhook that waits for the conversion,
    /// so it is refused from async code (write such objects over HTTP there).
    pub fn apply_object(&self, object: Value) -> Result<Value, ApiError> {
        let (api_version, kind) = (object["apiVersion"].as_str(), object["kind"].as_str());
        let Some(view) = conversion::find_view_of(api_version.unwrap_or(""), kind.unwrap_or(""))
        else {
            return self.shared.lock().put_fixture(object);
        };
        let view = &conversion::VIEWS[view];
        let kind = &store::KINDS[view.kind];
        if !view.webhook {
            // Strategy None: only apiVersion changes.
            let mut object = object;
            object["apiVersion"] = Value::from(kind.api_version);
            return self.shared.lock().put_fixture(object);
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(ApiError::bad_request(
                "apply_object cannot wait for a conversion in async code; write other versions over HTTP",
            ));
        }
        let stored = self.shared.runtime.block_on(self.shared.convert_one(
            kind,
            view.webhook,
            object,
            kind.api_version,
        ))?;
        self.shared.lock().put_fixture(stored)
    }

    /// Makes the double convert custom resources through the conversion webhook at
    /// `url` (`https://HOST:PORT/PATH`, as a CRD's `clientConfig` names it), trusting
    /// `ca_pem` (the CRD's `caBundle`): every request in a version other than the
    /// stored one of a kind whose CRD converts with `strategy: Webhook` calls it with
    /// ConversionReviews, as the API server does.
    pub fn use_conversion_webhook(&self, url: &str, ca_pem: &str) -> Result<(), ApiError> {
        let _entered = self.shared.runtime.enter();
        let webhook = conversion::Webhook::new(url, ca_pem).map_err(ApiError::bad_request)?;
        *self
            .shared
            .webhook
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(webhook));
        Ok(())
    }

    /// Deletes an object at once, finalizers or not; returns its last state.
    pub fn delete_object(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let k = find_kind(api_version, kind)?;
        let ns = if KINDS[k].namespaced {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        self.shared.lock().delete_fixture(k, ns, name)
    }

    /// The stored object, if any.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let k = find_kind(api_version, kind)?;
        let ns = if KINDS[k].namespaced {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        self.shared.lock().get(k, ns, name).ok()
    }

    /// The current resourceVersion (of the last change).
    pub fn resource_version(&self) -> String {
        self.shared.lock().resource_version().to_string()
    }

    /// Forgets the change history: watches and list continuations from an older
    /// resourceVersion now get 410 Gone.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// Ends every open watch stream abruptly, mid-stream, as a broken connection would.
    pub fn cut_watches(&self) {
        self.shared.lock().cut_watches();
    }

    /// How many watch streams are open.
    pub fn watch_count(&self) -> usize {
        self.shared.lock().watch_count()
    }

    /// How many requests had this verb (`get`, `list`, `watch`, `create`, `update`,
    /// `patch`, `delete`, `deletecollection`), resource (`plural` in any group, or
    /// `plural.group`) and subresource (`""` or `"status"`).
    pub fn requests(&self, verb: &str, resource: &str, subresource: &str) -> usize {
        let (plural, group) = resource
            .split_once('.')
            .map_or((resource, None), |(p, g)| (p, Some(g)));
        let store = self.shared.lock();
        let matching = store.requests.iter().filter(|((v, g, p, s), _)| {
            v == verb && *p == plural && s == subresource && group.is_none_or(|want| want == *g)
        });
        matching.map(|(_, n)| n).sum()
    }

    /// Forgets the request counts.
    pub fn reset_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Issues a service-account token that TokenReview accepts for `audience` until
    /// `ttl` has passed. It is JWT-shaped, with the claims the API server's tokens
    /// have (`exp` among them), and an unverifiable random signature.
    pub fn issue_token(
        &self,
        namespace: &str,
        service_account: &str,
        pod_name: &str,
        pod_uid: &str,
        audience: &str,
        ttl: Duration,
    ) -> String {
        let mut store = self.shared.lock();
        // The service account's uid if the test created it, else a made-up one.
        let service_account_uid = find_kind("v1", "ServiceAccount")
            .and_then(|k| store.get(k, namespace, service_account).ok())
            .and_then(|sa| sa.get("metadata")?.get("uid")?.as_str().map(String::from))
            .unwrap_or_else(store::new_uid);
        let issued = IssuedToken {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            service_account_uid,
            pod_name: pod_name.to_string(),
            pod_uid: pod_uid.to_string(),
            audience: audience.to_string(),
            expires: Instant::now() + ttl,
        };
        let token = issued.encode(ttl);
        store.tokens.insert(token.clone(), issued);
        token
    }
}
