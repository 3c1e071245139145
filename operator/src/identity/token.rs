//! Binds an xDS stream to the pod it claims to be by the pod's projected ServiceAccount
//! token (audience [`TOKEN_AUDIENCE`]), which the API server checks in a TokenReview.
//!
//! A projected token is bound to its pod: the review names the service account
//! (`system:serviceaccount:NS:SA`) and the pod (`authentication.kubernetes.io/pod-name`),
//! so a sidecar can only ever claim its own pod, whatever its network looks like.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use weft_xds::{Admission, StreamCredentials, StreamPolicy};

use super::NodeBinding;
use super::binding::NodeTable;
use crate::error::WeftError;
use crate::index::MeshModel;

/// The audience of the token a sidecar presents (the webhook projects it with this one).
pub const TOKEN_AUDIENCE: &str = "weft";
/// The TokenReview's `user.extra` key naming the pod a token is bound to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// The TokenReview's `user.extra` key with the uid of that pod.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// Most reviews kept; past it, expired ones go first, then those expiring soonest.
const MAX_CACHED: usize = 100_000;
/// How long a review of a token without a readable `exp` is kept.
const NO_EXPIRY_TTL: Duration = Duration::from_secs(60);
/// The longest a successful review is kept, whatever the token's `exp`: a token of a
/// deleted pod stops working at the API server, and a cache must not outlive that long.
const MAX_TTL: Duration = Duration::from_secs(600);
/// How long a rejection is kept: long enough that a proxy retrying a bad token does not
/// cost a TokenReview per attempt, short enough not to matter (a new token is a new key).
const REJECTED_TTL: Duration = Duration::from_secs(3);
/// The longest JWT payload read for its `exp` (a projected token's is a few hundred bytes).
const MAX_PAYLOAD_CHARS: usize = 16 * 1024;

/// Who the API server says a token belongs to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReviewedToken {
    /// `user.username`: `system:serviceaccount:NAMESPACE:NAME` for a service account.
    pub username: String,
    /// `status.audiences`: the requested audiences the token is valid for.
    pub audiences: Vec<String>,
    /// The pod the token is bound to ([`POD_NAME_EXTRA`]), if it is.
    pub pod_name: Option<String>,
    /// That pod's uid ([`POD_UID_EXTRA`]).
    pub pod_uid: Option<String>,
}

/// What a TokenReview concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenVerdict {
    /// The token is valid: whose it is.
    Authenticated(ReviewedToken),
    /// It is not (expired, for another audience, of a deleted pod, forged): the reason.
    Rejected(String),
}

/// Reviews bearer tokens: the API server's TokenReview, or a fake in tests.
pub trait TokenReviewer: Send + Sync + std::fmt::Debug {
    /// Reviews `token` for `audience`; `Err` when no verdict could be had (the API
    /// server unreachable, say), which is never cached.
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<TokenVerdict, WeftError>>;
}

/// What a pod's token must say: from the model.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodIdentity {
    namespace: String,
    name: String,
    service_account: String,
}

/// The time, injectable so tests can expire cache entries.
type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Binds each ADS stream to a pod by its bearer token, reviewed by `R` and cached
/// until the token expires; kept current with the model like [`super::PodAddressBinding`].
pub struct TokenBinding<R> {
    reviewer: R,
    audience: String,
    pods: NodeTable<PodIdentity>,
    cache: Mutex<ReviewCache>,
    clock: Clock,
}

impl<R> std::fmt::Debug for TokenBinding<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenBinding")
            .field("audience", &self.audience)
            .field(
                "cached_reviews",
                &self
                    .cache
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entries
                    .len(),
            )
            .finish_non_exhaustive()
    }
}

impl<R: TokenReviewer> TokenBinding<R> {
    /// A binding that reviews tokens with `reviewer` for [`TOKEN_AUDIENCE`].
    pub fn new(reviewer: R) -> Self {
        Self {
            reviewer,
            audience: TOKEN_AUDIENCE.to_string(),
            pods: NodeTable::new(|w| PodIdentity {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                service_account: w.service_account.clone(),
            }),
            cache: Mutex::new(ReviewCache::new(MAX_CACHED)),
            clock: Arc::new(SystemTime::now),
        }
    }

    /// Takes the pods and their service accounts from a new model.
    pub fn update(&self, model: &MeshModel) {
        self.pods.update(model);
    }

    /// Takes the pods `nodes` (changed, added or gone) from the model.
    pub fn update_nodes<'a>(&self, model: &MeshModel, nodes: impl IntoIterator<Item = &'a String>) {
        self.pods.update_nodes(model, nodes);
    }

    /// What a stream presenting `credentials` and claiming to be `node` may have.
    async fn admission(&self, node: &str, credentials: &StreamCredentials) -> Admission {
        let pod = self.pods.get(node);
        // An unknown node has no workload config or secrets to protect.
        let Some(pod) = pod else {
            return Admission::Fallback;
        };
        let Some(token) = credentials
            .bearer_token
            .as_deref()
            .filter(|t| !t.is_empty())
        else {
            return Admission::Denied(format!(
                "the stream claiming pod {node} presents no bearer token (a sidecar \
                 proves its pod with its ServiceAccount token: `weft bootstrap --token-file`)"
            ));
        };
        match self.reviewed(token).await {
            Ok(TokenVerdict::Authenticated(reviewed)) => {
                match matches_pod(&pod, &reviewed, &self.audience) {
                    Ok(()) => Admission::Own,
                    Err(why) => Admission::Denied(format!(
                        "the token of the stream claiming pod {node} {why}"
                    )),
                }
            }
            Ok(TokenVerdict::Rejected(why)) => Admission::Denied(format!(
                "the API server rejected the token of the stream claiming pod {node}: {why}"
            )),
            Err(e) => Admission::Denied(format!(
                "the token of the stream claiming pod {node} could not be reviewed: {e}"
            )),
        }
    }

    /// The verdict on `token`: cached, or asked of the reviewer and cached.
    async fn reviewed(&self, token: &str) -> Result<TokenVerdict, WeftError> {
        // The cache keys on a digest so that it holds no usable credentials.
        let key = token_key(token);
        let now = (self.clock)();
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key, now)
        {
            return Ok(hit);
        }
        let verdict = self.reviewer.review(token, &self.audience).await?;
        let now = (self.clock)();
        let ttl = match &verdict {
            TokenVerdict::Authenticated(_) => authenticated_ttl(token, now),
            TokenVerdict::Rejected(_) => REJECTED_TTL,
        };
        if !ttl.is_zero() {
            self.cache
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key, verdict.clone(), now + ttl, now);
        }
        Ok(verdict)
    }
}

impl<R: TokenReviewer> StreamPolicy for TokenBinding<R> {
    fn check<'a>(
        &'a self,
        node: &'a str,
        credentials: &'a StreamCredentials,
    ) -> BoxFuture<'a, Admission> {
        Box::pin(self.admission(node, credentials))
    }
}

impl<R: TokenReviewer> NodeBinding for TokenBinding<R> {
    fn update_nodes(&self, model: &MeshModel, nodes: &BTreeSet<String>) {
        TokenBinding::update_nodes(self, model, nodes);
    }
}

/// `Ok` when the reviewed token is `pod`'s own, else what is wrong with it (to follow
/// "the token of the stream claiming pod X").
fn matches_pod(pod: &PodIdentity, token: &ReviewedToken, audience: &str) -> Result<(), String> {
    // An API server that ignores audiences returns none: such a token is only proven
    // valid for the API server itself (the pod's default token, say), not for us.
    if !token.audiences.iter().any(|a| a == audience) {
        return Err(if token.audiences.is_empty() {
            format!(
                "is not valid for audience {audience:?}: the API server vouches for it for \
                 its own audience only"
            )
        } else {
            format!(
                "is not valid for audience {audience:?} (valid for {:?})",
                token.audiences
            )
        });
    }
    let expected = format!(
        "system:serviceaccount:{}:{}",
        pod.namespace, pod.service_account
    );
    if token.username != expected {
        let whose = match token.username.strip_prefix("system:serviceaccount:") {
            Some(sa) => format!("service account {}", sa.replacen(':', "/", 1)),
            None => format!("user {:?}, not a service account", token.username),
        };
        return Err(format!(
            "belongs to {whose}, but the pod runs as service account {}/{}",
            pod.namespace, pod.service_account
        ));
    }
    match token.pod_name.as_deref() {
        Some(name) if name == pod.name => Ok(()),
        Some(name) => Err(format!(
            "was issued to pod {}/{name}, not to {}/{}",
            pod.namespace, pod.namespace, pod.name
        )),
        None => Err(format!(
            "is not bound to a pod (no {POD_NAME_EXTRA}): a sidecar must present its \
             projected token"
        )),
    }
}

/// How long a successful review of `token` is kept: until its `exp`, at most
/// [`MAX_TTL`]; [`NO_EXPIRY_TTL`] without a readable `exp`; zero once expired.
fn authenticated_ttl(token: &str, now: SystemTime) -> Duration {
    match jwt_expiry(token) {
        Some(exp) => exp.duration_since(now).unwrap_or_default().min(MAX_TTL),
        None => NO_EXPIRY_TTL,
    }
}

/// The `exp` claim of a JWT, read without verifying it: the TokenReview verified the
/// token, this only says how long that verdict holds.
fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    if payload.len() > MAX_PAYLOAD_CHARS {
        return None;
    }
    let claims: serde_json::Value = serde_json::from_slice(&base64url_decode(payload)?).ok()?;
    let exp = claims.get("exp")?;
    let secs = exp.as_u64().or_else(|| {
        exp.as_f64()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| s as u64)
    })?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// Decodes base64url (RFC 4648 §5), with or without padding; `None` if malformed.
fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in text.bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A single leftover character cannot encode a byte.
    (bits < 6).then_some(out)
}

type TokenKey = [u8; 32];

fn token_key(token: &str) -> TokenKey {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut key = [0; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

/// Verdicts by token digest, each until a deadline, at most `capacity` of them.
#[derive(Debug)]
struct ReviewCache {
    entries: HashMap<TokenKey, (TokenVerdict, SystemTime)>,
    capacity: usize,
}

impl ReviewCache {
    fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    fn get(&mut self, key: &TokenKey, now: SystemTime) -> Option<TokenVerdict> {
        match self.entries.get(key) {
            Some((verdict, until)) if *until > now => Some(verdict.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, key: TokenKey, verdict: TokenVerdict, until: SystemTime, now: SystemTime) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.make_room(now);
        }
        self.entries.insert(key, (verdict, until));
    }

    /// Drops expired entries, then, if still full, the tenth that expires soonest (so a
    /// flood of new tokens costs one pass per tenth of the capacity, not one per token).
    fn make_room(&mut self, now: SystemTime) {
        self.entries.retain(|_, (_, until)| *until > now);
        if self.entries.len() < self.capacity {
            return;
        }
        let mut deadlines: Vec<SystemTime> = self.entries.values().map(|(_, u)| *u).collect();
        let cut = (deadlines.len() / 10).max(1) - 1;
        let (_, threshold, _) = deadlines.select_nth_unstable(cut);
        let threshold = *threshold;
        self.entries.retain(|_, (_, until)| *until > threshold);
    }
}

/// The most TokenReviews in flight at once: a control-plane restart reconnects every
/// proxy at once, and the API server should not take them all in the same instant.
const MAX_CONCURRENT_REVIEWS: usize = 32;
/// How long a TokenReview may take before the stream is denied (it retries).
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// Reviews tokens with the API server's `authentication.k8s.io/v1` TokenReview.
#[derive(Clone)]
pub struct KubeTokenReviewer {
    client: kube::Client,
    permits: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for KubeTokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTokenReviewer").finish_non_exhaustive()
    }
}

impl KubeTokenReviewer {
    /// Reviews with `client` (which needs `create` on `tokenreviews`).
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            permits: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_REVIEWS)),
        }
    }
}

impl TokenReviewer for KubeTokenReviewer {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<TokenVerdict, WeftError>> {
        Box::pin(async move {
            let _permit = self
                .permits
                .acquire()
                .await
                .map_err(|e| WeftError::Identity(format!("TokenReview: {e}")))?;
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: token.to_string(),
                    audiences: Some(vec![audience.to_string()]),
                },
                ..TokenReview::default()
            };
            let api = kube::Api::<TokenReview>::all(self.client.clone());
            let created = tokio::time::timeout(
                REVIEW_TIMEOUT,
                api.create(&kube::api::PostParams::default(), &review),
            )
            .await
            .map_err(|_| {
                WeftError::Identity(format!(
                    "TokenReview: no answer from the API server within {}s",
                    REVIEW_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| WeftError::kube("creating a TokenReview", e))?;
            Ok(verdict(created.status))
        })
    }
}

/// The verdict in a TokenReview's status.
fn verdict(status: Option<TokenReviewStatus>) -> TokenVerdict {
    let Some(status) = status else {
        return TokenVerdict::Rejected("the TokenReview came back without a status".into());
    };
    if status.authenticated != Some(true) {
        let why = status
            .error
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "not authenticated".to_string());
        return TokenVerdict::Rejected(why);
    }
    let user = status.user.unwrap_or_default();
    let extra = |key: &str| {
        user.extra
            .as_ref()
            .and_then(|e| e.get(key))
            .and_then(|values| values.first())
            .cloned()
    };
    TokenVerdict::Authenticated(ReviewedToken {
        pod_name: extra(POD_NAME_EXTRA),
        pod_uid: extra(POD_UID_EXTRA),
        username: user.username.unwrap_or_default(),
        audiences: status.audiences.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::index::Index;
    use crate::sources::parse_manifests;

    const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop}\nspec: {serviceAccountName: web}\nstatus: {podIP: 198.18.0.2}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop}\nspec: {serviceAccountName: web}\nstatus: {podIP: 198.18.0.3}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: db-0, namespace: shop}\nspec: {serviceAccountName: db}\nstatus: {podIP: 198.18.0.4}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: blog}\nspec: {serviceAccountName: web}\nstatus: {podIP: 198.18.0.5}\n";

    /// A JWT-shaped token whose payload carries `exp` (and a `jti` to tell tokens apart).
    fn jwt(id: &str, exp: Option<u64>) -> String {
        let payload = match exp {
            Some(exp) => format!(r#"{{"jti":"{id}","exp":{exp}}}"#),
            None => format!(r#"{{"jti":"{id}"}}"#),
        };
        format!(
            "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
            base64url(payload.as_bytes())
        )
    }

    fn base64url(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            }
        }
        out
    }

    /// Reviews from a table of tokens, counting the reviews.
    #[derive(Debug, Default)]
    struct FakeReviewer {
        tokens: Mutex<HashMap<String, TokenVerdict>>,
        calls: AtomicUsize,
        unreachable: std::sync::atomic::AtomicBool,
    }

    impl FakeReviewer {
        fn issue(&self, token: &str, namespace: &str, sa: &str, pod: Option<&str>) {
            let reviewed = ReviewedToken {
                username: format!("system:serviceaccount:{namespace}:{sa}"),
                audiences: vec![TOKEN_AUDIENCE.to_string()],
                pod_name: pod.map(str::to_string),
                pod_uid: pod.map(|p| format!("uid-{p}")),
            };
            self.set(token, TokenVerdict::Authenticated(reviewed));
        }

        fn set(&self, token: &str, verdict: TokenVerdict) {
            self.tokens
                .lock()
                .unwrap()
                .insert(token.to_string(), verdict);
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl TokenReviewer for Arc<FakeReviewer> {
        fn review<'a>(
            &'a self,
            token: &'a str,
            audience: &'a str,
        ) -> BoxFuture<'a, Result<TokenVerdict, WeftError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            assert_eq!(audience, TOKEN_AUDIENCE);
            let answer = if self.unreachable.load(Ordering::SeqCst) {
                Err(WeftError::Identity("connection refused".into()))
            } else {
                Ok(self
                    .tokens
                    .lock()
                    .unwrap()
                    .get(token)
                    .cloned()
                    .unwrap_or_else(|| TokenVerdict::Rejected("token not issued".into())))
            };
            Box::pin(std::future::ready(answer))
        }
    }

    struct Fixture {
        reviewer: Arc<FakeReviewer>,
        binding: TokenBinding<Arc<FakeReviewer>>,
        now: Arc<Mutex<SystemTime>>,
    }

    impl Fixture {
        fn new() -> Self {
            let reviewer = Arc::new(FakeReviewer::default());
            let now = Arc::new(Mutex::new(UNIX_EPOCH + Duration::from_secs(1_800_000_000)));
            let mut binding = TokenBinding::new(reviewer.clone());
            let clock = now.clone();
            binding.clock = Arc::new(move || *clock.lock().unwrap());
            let mut index = Index::new();
            index.reset(parse_manifests(PODS).unwrap());
            binding.update(index.model());
            Self {
                reviewer,
                binding,
                now,
            }
        }

        fn epoch_secs(&self) -> u64 {
            self.now
                .lock()
                .unwrap()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs()
        }

        fn advance(&self, by: Duration) {
            *self.now.lock().unwrap() += by;
        }

        async fn admit(&self, node: &str, token: Option<&str>) -> Admission {
            let credentials = StreamCredentials {
                peer: None,
                bearer_token: token.map(str::to_string),
            };
            self.binding.check(node, &credentials).await
        }

        async fn denied(&self, node: &str, token: Option<&str>) -> String {
            match self.admit(node, token).await {
                Admission::Denied(why) => why,
                other => panic!("{node} with {token:?}: expected a denial, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_pods_own_token_gets_its_config_and_any_other_is_denied() {
        let f = Fixture::new();
        let exp = Some(f.epoch_secs() + 3600);
        let web0 = jwt("web-0", exp);
        f.reviewer.issue(&web0, "shop", "web", Some("web-0"));
        assert_eq!(f.admit("shop/web-0", Some(&web0)).await, Admission::Own);

        let why = f.denied("shop/web-0", None).await;
        assert!(why.contains("no bearer token"), "{why}");
        let why = f.denied("shop/web-0", Some("")).await;
        assert!(why.contains("no bearer token"), "{why}");

        // Same service account, another pod: a stolen or shared token.
        let why = f.denied("shop/web-1", Some(&web0)).await;
        assert!(
            why.contains("issued to pod shop/web-0, not to shop/web-1"),
            "{why}"
        );
        // Another service account in the namespace.
        let why = f.denied("shop/db-0", Some(&web0)).await;
        assert!(
            why.contains("belongs to service account shop/web")
                && why.contains("runs as service account shop/db"),
            "{why}"
        );
        // Same pod and service account names, another namespace.
        let why = f.denied("blog/web-0", Some(&web0)).await;
        assert!(
            why.contains("belongs to service account shop/web") && why.contains("blog/web"),
            "{why}"
        );
        // Unauthenticated: unknown, expired, revoked.
        f.reviewer.set(
            "expired",
            TokenVerdict::Rejected("service account token has expired".into()),
        );
        let why = f.denied("shop/web-0", Some("expired")).await;
        assert!(
            why.contains("rejected") && why.contains("has expired"),
            "{why}"
        );
        let why = f.denied("shop/web-0", Some("forged")).await;
        assert!(why.contains("token not issued"), "{why}");

        // Unknown nodes have nothing to protect, token or not.
        assert_eq!(f.admit("shop/unknown", None).await, Admission::Fallback);
        assert_eq!(
            f.admit("shop/unknown", Some(&web0)).await,
            Admission::Fallback
        );
    }

    #[tokio::test]
    async fn tokens_for_another_audience_or_no_pod_are_denied() {
        let f = Fixture::new();
        let exp = Some(f.epoch_secs() + 3600);
        // An API server that ignores audiences vouches only for its own.
        let default_token = jwt("default", exp);
        f.reviewer.set(
            &default_token,
            TokenVerdict::Authenticated(ReviewedToken {
                username: "system:serviceaccount:shop:web".into(),
                audiences: Vec::new(),
                pod_name: Some("web-0".into()),
                pod_uid: None,
            }),
        );
        let why = f.denied("shop/web-0", Some(&default_token)).await;
        assert!(why.contains("not valid for audience \"weft\""), "{why}");
        // `kubectl create token web`: the right account, but bound to no pod.
        let unbound = jwt("unbound", exp);
        f.reviewer.issue(&unbound, "shop", "web", None);
        let why = f.denied("shop/web-0", Some(&unbound)).await;
        assert!(why.contains("not bound to a pod"), "{why}");
        // A user, not a service account.
        let user = jwt("user", exp);
        f.reviewer.set(
            &user,
            TokenVerdict::Authenticated(ReviewedToken {
                username: "alice".into(),
                audiences: vec![TOKEN_AUDIENCE.into()],
                pod_name: None,
                pod_uid: None,
            }),
        );
        let why = f.denied("shop/web-0", Some(&user)).await;
        assert!(why.contains("user \"alice\""), "{why}");
    }

    #[tokio::test]
    async fn reviews_are_cached_until_the_token_expires() {
        let f = Fixture::new();
        let web0 = jwt("web-0", Some(f.epoch_secs() + 300));
        f.reviewer.issue(&web0, "shop", "web", Some("web-0"));
        for _ in 0..5 {
            assert_eq!(f.admit("shop/web-0", Some(&web0)).await, Admission::Own);
        }
        assert_eq!(f.reviewer.calls(), 1, "one review, then the cache");
        // The cached verdict is checked against each claim, not reused blindly.
        assert!(matches!(
            f.admit("shop/web-1", Some(&web0)).await,
            Admission::Denied(_)
        ));
        assert_eq!(f.reviewer.calls(), 1);

        f.advance(Duration::from_secs(299));
        assert_eq!(f.admit("shop/web-0", Some(&web0)).await, Admission::Own);
        assert_eq!(f.reviewer.calls(), 1);
        // At `exp` the entry is gone and the API server decides again.
        f.advance(Duration::from_secs(1));
        f.reviewer.set(
            &web0,
            TokenVerdict::Rejected("service account token has expired".into()),
        );
        assert!(matches!(
            f.admit("shop/web-0", Some(&web0)).await,
            Admission::Denied(_)
        ));
        assert_eq!(f.reviewer.calls(), 2);
    }

    #[tokio::test]
    async fn expiry_bounds_failures_and_rejections_set_how_long_a_verdict_holds() {
        let f = Fixture::new();
        // No readable exp: a minute.
        let opaque = "not-a-jwt";
        f.reviewer.issue(opaque, "shop", "web", Some("web-0"));
        assert_eq!(f.admit("shop/web-0", Some(opaque)).await, Admission::Own);
        f.advance(Duration::from_secs(59));
        assert_eq!(f.admit("shop/web-0", Some(opaque)).await, Admission::Own);
        assert_eq!(f.reviewer.calls(), 1);
        f.advance(Duration::from_secs(1));
        assert_eq!(f.admit("shop/web-0", Some(opaque)).await, Admission::Own);
        assert_eq!(f.reviewer.calls(), 2, "re-reviewed after a minute");

        // A far exp is capped.
        let long = jwt("long", Some(f.epoch_secs() + 365 * 86_400));
        f.reviewer.issue(&long, "shop", "web", Some("web-0"));
        f.admit("shop/web-0", Some(&long)).await;
        f.advance(MAX_TTL);
        f.admit("shop/web-0", Some(&long)).await;
        assert_eq!(f.reviewer.calls(), 4, "re-reviewed after {MAX_TTL:?}");

        // A rejection holds for seconds only.
        let fresh = jwt("fresh", Some(f.epoch_secs() + 3600));
        f.admit("shop/web-0", Some(&fresh)).await;
        f.admit("shop/web-0", Some(&fresh)).await;
        assert_eq!(f.reviewer.calls(), 5, "a rejection is cached briefly");
        f.reviewer.issue(&fresh, "shop", "web", Some("web-0"));
        f.advance(REJECTED_TTL);
        assert_eq!(f.admit("shop/web-0", Some(&fresh)).await, Admission::Own);
        assert_eq!(f.reviewer.calls(), 6);

        // A failed review is not cached at all, and says why.
        let other = jwt("other", Some(f.epoch_secs() + 3600));
        f.reviewer.issue(&other, "shop", "web", Some("web-0"));
        f.reviewer.unreachable.store(true, Ordering::SeqCst);
        let why = f.denied("shop/web-0", Some(&other)).await;
        assert!(
            why.contains("could not be reviewed") && why.contains("connection refused"),
            "{why}"
        );
        f.reviewer.unreachable.store(false, Ordering::SeqCst);
        assert_eq!(f.admit("shop/web-0", Some(&other)).await, Admission::Own);
        assert_eq!(f.reviewer.calls(), 8);

        // An already expired token is never cached.
        let stale = jwt("stale", Some(f.epoch_secs() - 1));
        f.reviewer.issue(&stale, "shop", "web", Some("web-0"));
        f.admit("shop/web-0", Some(&stale)).await;
        f.admit("shop/web-0", Some(&stale)).await;
        assert_eq!(f.reviewer.calls(), 10);
    }

    #[tokio::test]
    async fn the_binding_follows_the_model() {
        let f = Fixture::new();
        let token = jwt("new-0", Some(f.epoch_secs() + 3600));
        f.reviewer.issue(&token, "shop", "web", Some("new-0"));
        assert_eq!(
            f.admit("shop/new-0", Some(&token)).await,
            Admission::Fallback
        );
        let mut index = Index::new();
        let added = format!(
            "{PODS}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: new-0, namespace: shop}}\nspec: {{serviceAccountName: web}}\n"
        );
        index.reset(parse_manifests(&added).unwrap());
        let nodes: BTreeSet<String> = ["shop/new-0".to_string(), "shop/web-0".to_string()].into();
        NodeBinding::update_nodes(&f.binding, index.model(), &nodes);
        assert_eq!(f.admit("shop/new-0", Some(&token)).await, Admission::Own);
        // Gone from the model: unknown again.
        let mut index = Index::new();
        index.reset(parse_manifests(PODS).unwrap());
        NodeBinding::update_nodes(&f.binding, index.model(), &nodes);
        assert_eq!(
            f.admit("shop/new-0", Some(&token)).await,
            Admission::Fallback
        );
    }

    #[test]
    fn the_cache_is_bounded_and_evicts_expired_entries_first() {
        let start = UNIX_EPOCH + Duration::from_secs(1000);
        let mut cache = ReviewCache::new(20);
        let ok = TokenVerdict::Rejected(String::new());
        for i in 0..10u8 {
            cache.insert([i; 32], ok.clone(), start + Duration::from_secs(1), start);
        }
        for i in 10..20u8 {
            let until = start + Duration::from_secs(100 + u64::from(i));
            cache.insert([i; 32], ok.clone(), until, start);
        }
        assert_eq!(cache.entries.len(), 20);
        let later = start + Duration::from_secs(50);
        cache.insert(
            [20; 32],
            ok.clone(),
            later + Duration::from_secs(500),
            later,
        );
        assert_eq!(cache.entries.len(), 11, "the expired ten went first");
        assert!(cache.get(&[10; 32], later).is_some());
        // Full of live entries: those expiring soonest go.
        for i in 21..30u8 {
            cache.insert([i; 32], ok.clone(), later + Duration::from_secs(500), later);
        }
        assert_eq!(cache.entries.len(), 20);
        cache.insert(
            [30; 32],
            ok.clone(),
            later + Duration::from_secs(500),
            later,
        );
        assert!(cache.entries.len() <= 20);
        assert!(
            cache.get(&[10; 32], later).is_none(),
            "the soonest to expire was evicted"
        );
        assert!(cache.get(&[30; 32], later).is_some());
    }

    #[test]
    fn jwt_expiry_is_read_without_verification() {
        assert_eq!(
            jwt_expiry(&jwt("a", Some(1_700_000_000))),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(jwt_expiry(&jwt("a", None)), None);
        assert_eq!(jwt_expiry("no-dots"), None);
        assert_eq!(jwt_expiry("a.!!!.c"), None);
        assert_eq!(jwt_expiry(&format!("a.{}.c", base64url(b"[1,2]"))), None);
        assert_eq!(
            jwt_expiry(&format!("a.{}.c", base64url(br#"{"exp":-5}"#))),
            None
        );
        assert_eq!(
            jwt_expiry(&format!("a.{}.c", base64url(br#"{"exp":12.7}"#))),
            Some(UNIX_EPOCH + Duration::from_secs(12))
        );
        assert_eq!(base64url_decode("aGk"), Some(b"hi".to_vec()));
        assert_eq!(base64url_decode("aGk="), Some(b"hi".to_vec()));
        assert_eq!(base64url_decode("-_8"), Some(vec![0xfb, 0xff]));
        assert_eq!(base64url_decode("a"), None, "one character is no byte");
        assert_eq!(
            base64url_decode("a+b/"),
            None,
            "standard alphabet is not base64url"
        );
    }

    #[test]
    fn a_token_review_status_becomes_a_verdict() {
        use k8s_openapi::api::authentication::v1::UserInfo;
        assert!(matches!(verdict(None), TokenVerdict::Rejected(_)));
        let failed = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("[invalid bearer token, service account token has expired]".into()),
            ..Default::default()
        };
        assert_eq!(
            verdict(Some(failed)),
            TokenVerdict::Rejected(
                "[invalid bearer token, service account token has expired]".into()
            )
        );
        let ok = TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec!["weft".into()]),
            user: Some(UserInfo {
                username: Some("system:serviceaccount:shop:web".into()),
                extra: Some(
                    [
                        (POD_NAME_EXTRA.to_string(), vec!["web-0".to_string()]),
                        (POD_UID_EXTRA.to_string(), vec!["1234".to_string()]),
                    ]
                    .into(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            verdict(Some(ok)),
            TokenVerdict::Authenticated(ReviewedToken {
                username: "system:serviceaccount:shop:web".into(),
                audiences: vec!["weft".into()],
                pod_name: Some("web-0".into()),
                pod_uid: Some("1234".into()),
            })
        );
    }
}
