//! `weft check`: is the mesh installed and healthy? Each check passes or fails with
//! what it found and, on failure, a hint for the fix. Before an install
//! (`--pre-install`) only what the install needs is checked.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::ListParams;
use serde::Serialize;

use crate::error::WeftError;
use crate::identity::certificate_not_after;
use crate::runtime::admin::{self, ProxyStatus};
use crate::runtime::controller::webhook_cert::{
    DEFAULT_CONFIGURATION, DEFAULT_SECRET, DEFAULT_SERVICE,
};

/// The oldest Kubernetes minor version Weft's default injection supports (native
/// sidecars).
const MIN_MINOR: u32 = 29;

/// What `weft check` looks at.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// Kubeconfig file (else inferred); `None` with `local` skips Kubernetes.
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Kubeconfig context.
    pub context: Option<String>,
    /// Skip the Kubernetes checks (a mesh run by `weft up`).
    pub local: bool,
    /// Weft's namespace.
    pub namespace: String,
    /// The control plane's admin endpoint, for the CA and proxy checks.
    pub admin_addr: Option<String>,
    /// A Prometheus base URL (`http://HOST:PORT`) that should scrape the sidecars.
    pub prometheus: Option<String>,
    /// Only what an install needs.
    pub pre_install: bool,
    /// A certificate expiring sooner than this fails its check.
    pub expiry_margin: Duration,
}

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Fine.
    Pass,
    /// Needs fixing.
    Fail,
    /// Not applicable here (said why).
    Skip,
}

/// One check's result.
#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    /// What was checked.
    pub check: String,
    /// How it came out.
    pub outcome: Outcome,
    /// What was found.
    pub detail: String,
    /// How to fix it, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

fn pass(check: &str, detail: impl Into<String>) -> CheckResult {
    CheckResult {
        check: check.to_string(),
        outcome: Outcome::Pass,
        detail: detail.into(),
        hint: None,
    }
}

fn fail(check: &str, detail: impl Into<String>, hint: impl Into<String>) -> CheckResult {
    CheckResult {
        check: check.to_string(),
        outcome: Outcome::Fail,
        detail: detail.into(),
        hint: Some(hint.into()),
    }
}

fn skip(check: &str, detail: impl Into<String>) -> CheckResult {
    CheckResult {
        check: check.to_string(),
        outcome: Outcome::Skip,
        detail: detail.into(),
        hint: None,
    }
}

/// Runs every check that applies; `progress` hears each result as it comes.
pub async fn run_checks(
    opts: &CheckOptions,
    progress: &mut dyn FnMut(&CheckResult),
) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let mut record = |r: CheckResult, out: &mut Vec<CheckResult>| {
        progress(&r);
        out.push(r);
    };
    if opts.local {
        record(
            skip("Kubernetes", "--local: a mesh run by `weft up`"),
            &mut out,
        );
    } else {
        for r in kubernetes_checks(opts).await {
            record(r, &mut out);
        }
    }
    if opts.pre_install {
        return out;
    }
    match &opts.admin_addr {
        Some(addr) => {
            for r in admin_checks(addr, opts.expiry_margin).await {
                record(r, &mut out);
            }
        }
        None => record(
            skip(
                "control plane",
                "no --admin-addr: CA and proxy checks skipped",
            ),
            &mut out,
        ),
    }
    if let Some(url) = &opts.prometheus {
        record(prometheus_check(url).await, &mut out);
    }
    out
}

async fn kubernetes_checks(opts: &CheckOptions) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let client = match crate::runtime::controller::kube_client(
        opts.kubeconfig.as_deref(),
        opts.context.as_deref(),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            out.push(fail(
                "Kubernetes API",
                e.to_string(),
                "point --kubeconfig/--context (or KUBECONFIG) at the cluster, or use --local for `weft up`",
            ));
            return out;
        }
    };
    match client.apiserver_version().await {
        Ok(v) => {
            let minor: u32 = v
                .minor
                .trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .unwrap_or(0);
            if minor >= MIN_MINOR || v.major != "1" {
                out.push(pass(
                    "Kubernetes API",
                    format!("reachable, version {}", v.git_version),
                ));
            } else {
                out.push(fail(
                    "Kubernetes API",
                    format!("version {} has no native sidecars", v.git_version),
                    "install with --set injection.legacySidecar=true, or upgrade to 1.29 or newer",
                ));
            }
        }
        Err(e) => {
            out.push(fail(
                "Kubernetes API",
                format!("unreachable: {e}"),
                "check the kubeconfig's server address and credentials (`kubectl version`)",
            ));
            return out;
        }
    }
    if opts.pre_install {
        return out;
    }
    out.push(crds_check(&client).await);
    out.extend(webhook_checks(&client, &opts.namespace, opts.expiry_margin).await);
    out
}

async fn crds_check(client: &kube::Client) -> CheckResult {
    const CHECK: &str = "CRDs";
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut missing = Vec::new();
    let crds = weft_crds::all_crds();
    for (_, crd) in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        match api.get_opt(&name).await {
            Ok(Some(_)) => {}
            Ok(None) => missing.push(name),
            Err(e) => {
                return fail(
                    CHECK,
                    format!("listing CRDs: {e}"),
                    "check RBAC: reading customresourcedefinitions",
                );
            }
        }
    }
    if missing.is_empty() {
        pass(
            CHECK,
            format!("all {} of Weft's CRDs installed", crds.len()),
        )
    } else {
        fail(
            CHECK,
            format!("missing: {}", missing.join(", ")),
            "helm upgrade --install weft helm/weft installs them (or kubectl apply -f helm/weft/crds/)",
        )
    }
}

/// The injector: its configuration has a caBundle, its certificate is valid and not
/// about to expire, and its Service has ready endpoints.
async fn webhook_checks(
    client: &kube::Client,
    namespace: &str,
    margin: Duration,
) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    out.push(match configs.get_opt(DEFAULT_CONFIGURATION).await {
        Ok(Some(config)) => {
            let webhooks = config.webhooks.unwrap_or_default();
            let without: Vec<String> = webhooks
                .iter()
                .filter(|w| {
                    w.client_config
                        .ca_bundle
                        .as_ref()
                        .is_none_or(|b| b.0.is_empty())
                })
                .map(|w| w.name.clone())
                .collect();
            if webhooks.is_empty() || !without.is_empty() {
                fail(
                    "webhook configuration",
                    format!("{DEFAULT_CONFIGURATION}: webhooks without a caBundle: {without:?}"),
                    "the controller fills the caBundle: check that it runs and its log",
                )
            } else {
                pass(
                    "webhook configuration",
                    format!(
                        "{DEFAULT_CONFIGURATION}: {} webhook(s) with a caBundle",
                        webhooks.len()
                    ),
                )
            }
        }
        Ok(None) => fail(
            "webhook configuration",
            format!("MutatingWebhookConfiguration {DEFAULT_CONFIGURATION} not found"),
            "the chart installs it: helm upgrade --install weft helm/weft",
        ),
        Err(e) => fail(
            "webhook configuration",
            e.to_string(),
            "check RBAC: reading mutatingwebhookconfigurations",
        ),
    });
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret_ref = format!("Secret {namespace}/{DEFAULT_SECRET}");
    out.push(match secrets.get_opt(DEFAULT_SECRET).await {
        Ok(Some(secret)) => {
            let pem = secret
                .data
                .as_ref()
                .and_then(|d| d.get("tls.crt"))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned());
            match pem.as_deref().map(certificate_not_after) {
                Some(Ok(not_after)) => certificate_verdict(
                    "webhook certificate",
                    &secret_ref,
                    not_after,
                    margin,
                    &format!("the controller renews it at half its lifetime, so it is not running or cannot write Secrets (see its log); delete {secret_ref} to have it issued again at once"),
                ),
                Some(Err(e)) => fail("webhook certificate", format!("{secret_ref}: {e}"), format!("delete {secret_ref}: the controller issues a new one")),
                None => fail("webhook certificate", format!("{secret_ref} has no tls.crt"), format!("delete {secret_ref}: the controller issues a new one")),
            }
        }
        Ok(None) => fail(
            "webhook certificate",
            format!("{secret_ref} not found"),
            "the controller creates it when it starts: check that it runs and its log",
        ),
        Err(e) => fail("webhook certificate", e.to_string(), "check RBAC: reading Secrets in Weft's namespace"),
    });
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let selector =
        ListParams::default().labels(&format!("kubernetes.io/service-name={DEFAULT_SERVICE}"));
    out.push(match slices.list(&selector).await {
        Ok(list) => {
            let ready = list
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter().flatten())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
                .count();
            if ready > 0 {
                pass("webhook reachable", format!("Service {namespace}/{DEFAULT_SERVICE} has {ready} ready endpoint(s)"))
            } else {
                fail(
                    "webhook reachable",
                    format!("Service {namespace}/{DEFAULT_SERVICE} has no ready endpoint: the API server cannot call the injector"),
                    format!("kubectl -n {namespace} get pods -l app.kubernetes.io/component=webhook; with failurePolicy Fail no pod of an injected namespace starts meanwhile"),
                )
            }
        }
        Err(e) => fail("webhook reachable", e.to_string(), "check RBAC: listing EndpointSlices"),
    });
    out
}

/// Pass, or fail when the certificate has expired or expires within `margin`.
fn certificate_verdict(
    check: &str,
    what: &str,
    not_after: SystemTime,
    margin: Duration,
    hint: &str,
) -> CheckResult {
    let now = SystemTime::now();
    let when = humantime::format_rfc3339_seconds(not_after);
    match not_after.duration_since(now) {
        Err(_) => fail(check, format!("{what} expired at {when}"), hint),
        Ok(left) if left < margin => fail(
            check,
            format!(
                "{what} expires at {when}, in {}",
                humantime::format_duration(Duration::from_secs(left.as_secs()))
            ),
            hint,
        ),
        Ok(left) => pass(
            check,
            format!(
                "{what} valid until {when} ({} left)",
                humantime::format_duration(Duration::from_secs(left.as_secs() / 3600 * 3600))
            ),
        ),
    }
}

async fn admin_checks(addr: &str, margin: Duration) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let metrics = match admin::http_request(addr, hyper::Method::GET, "/metrics").await {
        Ok((status, body)) if status.is_success() => String::from_utf8_lossy(&body).into_owned(),
        Ok((status, _)) => {
            out.push(fail(
                "control plane",
                format!("{addr}/metrics: HTTP {status}"),
                "is --admin-addr the control plane's admin endpoint?",
            ));
            return out;
        }
        Err(e) => {
            out.push(fail(
                "control plane",
                e.to_string(),
                "start it, or point --admin-addr at it (in a cluster: kubectl -n weft-system port-forward deploy/weft-controller 15090)",
            ));
            return out;
        }
    };
    out.push(pass(
        "control plane",
        format!("admin endpoint {addr} answers"),
    ));
    let ca = metrics
        .lines()
        .find_map(|l| l.strip_prefix("weft_ca_certificate_expiry_timestamp_seconds "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    out.push(match ca {
        Some(secs) => certificate_verdict(
            "CA certificate",
            "the mesh CA",
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            margin,
            "rotate the root before it expires (README: Rotating the root)",
        ),
        None => skip(
            "CA certificate",
            "the control plane runs without a CA (no workload identity)",
        ),
    });
    out.push(
        match admin::fetch::<Vec<ProxyStatus>>(addr, "/proxy-status").await {
            Ok(proxies) => proxies_verdict(&proxies),
            Err(e) => fail(
                "proxies in sync",
                e.to_string(),
                "is --admin-addr the control plane's admin endpoint?",
            ),
        },
    );
    out
}

/// Every connected proxy has ACKed what it was sent.
fn proxies_verdict(proxies: &[ProxyStatus]) -> CheckResult {
    const CHECK: &str = "proxies in sync";
    let behind: Vec<String> = proxies
        .iter()
        .filter_map(|p| {
            let bad: Vec<String> = p
                .types
                .iter()
                .filter(|t| t.state != "SYNCED")
                .map(|t| match &t.nack {
                    Some(nack) => format!("{} NACKED: {nack}", t.type_name),
                    None => format!("{} {}", t.type_name, t.state),
                })
                .collect();
            (!bad.is_empty()).then(|| format!("{} ({})", p.node, bad.join(", ")))
        })
        .collect();
    if behind.is_empty() {
        pass(
            CHECK,
            format!("{} connected proxies, all in sync", proxies.len()),
        )
    } else {
        fail(
            CHECK,
            format!(
                "{} of {} behind: {}",
                behind.len(),
                proxies.len(),
                behind.join("; ")
            ),
            "`weft proxy-status` shows each; a NACK names what Envoy refused (`weft proxy-config POD` shows what was sent)",
        )
    }
}

/// Prometheus answers and scrapes at least one sidecar.
async fn prometheus_check(url: &str) -> CheckResult {
    const CHECK: &str = "Prometheus";
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let query = "/api/v1/query?query=count(envoy_server_live)";
    match admin::http_request(addr, hyper::Method::GET, query).await {
        Ok((status, body)) if status.is_success() => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let count = v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(0.0);
            if count > 0.0 {
                pass(CHECK, format!("{url} scrapes {count} sidecar(s)"))
            } else {
                fail(
                    CHECK,
                    format!("{url} answers but scrapes no sidecar"),
                    "enable the chart's PodMonitor (--set metrics.podMonitor.enabled=true) or a scrape job for port 15090 /stats/prometheus",
                )
            }
        }
        Ok((status, _)) => fail(
            CHECK,
            format!("{url}: HTTP {status}"),
            "is it the Prometheus server's base URL?",
        ),
        Err(e) => fail(
            CHECK,
            e.to_string(),
            "check the URL (in a cluster: kubectl port-forward to the Prometheus Service)",
        ),
    }
}

/// Writes the results as lines, with the hints under failures.
pub fn render_text(results: &[CheckResult]) -> String {
    results.iter().map(render_line).collect()
}

/// One result as text.
pub fn render_line(r: &CheckResult) -> String {
    let mark = match r.outcome {
        Outcome::Pass => "ok  ",
        Outcome::Fail => "FAIL",
        Outcome::Skip => "skip",
    };
    let mut line = format!("[{mark}] {}: {}\n", r.check, r.detail);
    if let Some(hint) = &r.hint {
        line.push_str(&format!("       fix: {hint}\n"));
    }
    line
}

/// Whether every check passed (or was skipped).
pub fn all_passed(results: &[CheckResult]) -> Result<(), WeftError> {
    let failed = results
        .iter()
        .filter(|r| r.outcome == Outcome::Fail)
        .count();
    if failed == 0 {
        Ok(())
    } else {
        Err(WeftError::Usage(format!("{failed} check(s) failed")))
    }
}
