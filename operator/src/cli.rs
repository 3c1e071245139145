//! The `weft` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::WeftError;
use crate::explain::{CallQuery, Explanation};
use crate::identity::CaSource;
use crate::runtime::admin::{self, MeshStatus, ProxyStatus};
use crate::runtime::controller::{self, ControllerOptions, ProxyIdentity};
use crate::runtime::local::{self, LocalOptions};
use crate::sidecar::bootstrap::{BootstrapOptions, XdsProtocol, XdsTls, render_bootstrap};
use crate::sidecar::iptables::{self, Backend, Cidr, RedirectPlan, TablesChoice};
use crate::translate::{AccessMode, MeshConfig, MtlsMode};

/// `println!` that neither panics nor fails when the reader went away (`| head`).
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = print_text(&format!("{}\n", format_args!($($arg)*)));
    }};
}

const DEFAULT_ADMIN: &str = "127.0.0.1:15090";

/// Weft: a service mesh control plane for Envoy.
#[derive(Debug, Parser)]
#[command(name = "weft", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane in local mode against a directory of manifests.
    Up {
        /// Directory of Kubernetes YAML manifests (watched for changes).
        dir: PathBuf,
        /// Address of the ADS (xDS) server; repeat it to listen on several (say an IPv4
        /// and an IPv6 address, for IPv6-only sidecars).
        #[arg(long = "xds-addr", default_value = "127.0.0.1:15010")]
        xds_addrs: Vec<SocketAddr>,
        /// Address of the admin endpoint (/ready, /status, /proxy-status).
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin_addr: SocketAddr,
        #[command(flatten)]
        identity: IdentityArgs,
    },
    /// Run the control plane in a cluster, from the Kubernetes API server.
    Controller(ControllerArgs),
    /// Print every API permission `weft controller` uses (its RBAC), as JSON.
    ControllerAccess,
    /// Print the Envoy bootstrap of a pod's sidecar.
    Bootstrap {
        /// The pod, as NAMESPACE/NAME.
        #[arg(long)]
        pod: String,
        /// The control plane's xDS address, HOST:PORT; repeat it for replicas that have
        /// no load-balancing Service in front (tried in turn).
        #[arg(long, required = true)]
        xds: Vec<String>,
        /// Envoy admin port (bound to 127.0.0.1).
        #[arg(long, default_value_t = 15000)]
        admin_port: u16,
        /// Connect to xDS over TLS, verifying the control plane against this root (PEM),
        /// e.g. the ca-cert.pem in `weft up`'s state directory.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Trust domain of the control plane's identity (with --ca-file).
        #[arg(long, default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Also serve the proxy's readiness (`/ready`) on 0.0.0.0:PORT for the kubelet
        /// (the injected sidecar probes 15021).
        #[arg(long)]
        health_port: Option<u16>,
        /// Also serve Envoy's Prometheus stats (`/stats/prometheus`) and its endpoint
        /// health (`/weft/clusters`, for `weft explain`) on 0.0.0.0:PORT (the injected
        /// sidecar uses 15090).
        #[arg(long)]
        metrics_port: Option<u16>,
        /// ADS variant: `delta` sends only what changed; `sotw` resends each type whole.
        #[arg(long, value_enum, default_value_t = XdsProtocol::Delta)]
        xds_protocol: XdsProtocol,
        /// Keep every Envoy statistic (by default only the mesh's are kept: per-cluster
        /// statistics of a large mesh cost tens of MB per sidecar).
        #[arg(long)]
        full_stats: bool,
        /// Send this token (the pod's projected ServiceAccount token, audience `weft`) as
        /// `authorization: Bearer` on every xDS stream, read anew for each stream so a
        /// rotated token is used. Needs --ca-file.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Write to this file instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Install (or with --remove, take out) the sidecar traffic redirect in this network namespace.
    InitIptables {
        /// UID the proxy runs as; its traffic is not redirected, except to its own pod
        /// (then to the inbound port).
        #[arg(long, default_value_t = 1337)]
        proxy_uid: u32,
        /// Port of the outbound capture listener.
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        /// Port of the inbound capture listener.
        #[arg(long, default_value_t = 15006)]
        inbound_port: u16,
        /// Inbound ports not redirected (comma separated).
        #[arg(long, value_delimiter = ',')]
        exclude_inbound_ports: Vec<u16>,
        /// Outbound destination CIDRs not redirected (comma separated, IPv4 and IPv6; each
        /// goes to the table of its family).
        #[arg(long, value_delimiter = ',')]
        exclude_outbound_cidrs: Vec<Cidr>,
        /// Outbound destination ports not redirected (comma separated).
        #[arg(long, value_delimiter = ',')]
        exclude_outbound_ports: Vec<u16>,
        /// Remove the redirect instead (both families; with `auto`, from every back end
        /// holding Weft's chains).
        #[arg(long)]
        remove: bool,
        /// Which iptables back end writes the rules: `auto` picks the one already holding
        /// Weft's chains, else the one with more rules here, else the system default, and
        /// falls back to the other if that one does not work in this kernel.
        #[arg(long, value_enum, default_value_t = IptablesBackendArg::Auto)]
        iptables_backend: IptablesBackendArg,
        /// Use this iptables program instead of a back end (overrides --iptables-backend);
        /// its `-restore` and `-save` siblings are used too, and for IPv6 the same name
        /// with `ip6tables` in place of its leading `iptables`.
        #[arg(long)]
        iptables: Option<String>,
    },
    /// Drain the local proxy: stop accepting new connections, give open ones time to finish.
    /// Run by the injected sidecar's preStop hook.
    DrainProxy {
        /// Envoy admin address.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin_addr: String,
        /// How long to wait after starting the drain.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// Wait until the local proxy is ready (LIVE). Run by the legacy sidecar's postStart hook.
    WaitProxyReady {
        /// Envoy admin address.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin_addr: String,
        /// Give up (and fail) after this long.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Show the objects local mode rejected and the manifest files it could not read.
    Status {
        /// Admin endpoint of `weft up`.
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin_addr: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Explain whether a call from a pod is allowed and where it is routed, from the
    /// model and settings the proxies have now.
    Explain {
        /// The calling pod, NAMESPACE/NAME.
        #[arg(long)]
        from: String,
        /// `http://HOST:PORT/PATH`, or `HOST:PORT` for TCP; HOST is a service name, its
        /// FQDN, a ClusterIP or a pod IP.
        url: String,
        /// HTTP method.
        #[arg(long, short = 'X')]
        method: Option<String>,
        /// A request header, `NAME: VALUE` (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// Admin endpoint of `weft up`.
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin_addr: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Per edge (calling pod → destination service): requests per second, success rate
    /// and latency, from the sidecars' stats over a window (read by `weft up` from each
    /// sidecar's metrics port).
    Top {
        /// Only callers in this namespace.
        namespace: Option<String>,
        /// How long to measure, e.g. `2s` (at most 60s).
        #[arg(long, default_value = "2s")]
        window: String,
        /// Admin endpoint of `weft up`.
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin_addr: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the installation and the mesh's health: CRDs, the injector (configuration,
    /// certificate, endpoints), the CA, every proxy in sync, Prometheus. Each failure
    /// comes with a fix; the exit status is 1 when one fails.
    Check {
        /// Kubeconfig file (default: KUBECONFIG, the in-cluster config, then ~/.kube/config).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Kubeconfig context to use.
        #[arg(long)]
        context: Option<String>,
        /// Weft's namespace.
        #[arg(long, default_value = "weft-system")]
        namespace: String,
        /// A mesh run by `weft up`: no Kubernetes checks.
        #[arg(long)]
        local: bool,
        /// Only what an install needs (API reachable, version).
        #[arg(long)]
        pre_install: bool,
        /// The control plane's admin endpoint (CA and proxy checks).
        #[arg(long)]
        admin_addr: Option<String>,
        /// Prometheus base URL, e.g. http://127.0.0.1:9090 (checks it scrapes sidecars).
        #[arg(long)]
        prometheus: Option<String>,
        /// A certificate expiring sooner than this fails.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        expiry_margin: std::time::Duration,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Open the live mesh page (service graph of observed calls, denied edges marked,
    /// a click explains an edge) served by the control plane's admin endpoint.
    Dashboard {
        /// Admin endpoint of `weft up`.
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin_addr: String,
        /// Only print the URL.
        #[arg(long)]
        no_open: bool,
    },
    /// Print the xDS resources the control plane serves one proxy, as Envoy's config
    /// dump writes them (private keys redacted).
    ProxyConfig {
        /// The proxy's pod, NAMESPACE/NAME (NAME alone: namespace `default`).
        pod: String,
        /// Only these kinds (default: all).
        #[arg(value_enum)]
        kinds: Vec<crate::proxy_config::ResourceKind>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Yaml)]
        output: OutputFormat,
        /// Admin endpoint of `weft up`.
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin_addr: String,
    },
    /// Show what each connected proxy was sent and has acknowledged.
    ProxyStatus {
        /// Admin endpoint of `weft up`.
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin_addr: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// How `weft proxy-config` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OutputFormat {
    /// JSON, as Envoy's config dump.
    Json,
    /// The same, as YAML.
    Yaml,
}

/// Workload identity and mTLS settings of `weft up`.
#[derive(Debug, clap::Args)]
struct IdentityArgs {
    /// Directory for the CA created on first start (key file mode 0600); reused on restart.
    /// Default: $XDG_STATE_HOME/weft, else ~/.local/state/weft.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Use this CA certificate (root or intermediate, PEM) instead of creating one.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// Private key (PEM) of --ca-cert.
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Certificates from --ca-cert's issuer up to the root (PEM), for an intermediate.
    #[arg(long, requires = "ca_cert")]
    ca_chain: Option<PathBuf>,
    /// More roots proxies trust besides the CA's own (PEM), e.g. the old root during a rotation.
    #[arg(long)]
    extra_trust_bundle: Option<PathBuf>,
    #[command(flatten)]
    mesh: MeshArgs,
}

/// Arguments of `weft controller`.
#[derive(Debug, clap::Args)]
struct ControllerArgs {
    /// Kubeconfig file (default: KUBECONFIG, the in-cluster config, then ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use.
    #[arg(long)]
    context: Option<String>,
    /// The controller's namespace (its CA Secret and Lease live there).
    #[arg(long, env = "POD_NAMESPACE", default_value = "weft-system")]
    namespace: String,
    /// This replica's name, the Lease holder identity (default: the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Address of the ADS (xDS) server; repeat it to listen on several.
    #[arg(long = "xds-addr", default_value = "0.0.0.0:15010")]
    xds_addrs: Vec<SocketAddr>,
    /// Address of the admin endpoint (/healthz, /readyz, /metrics, /status).
    #[arg(long, default_value = "0.0.0.0:15090")]
    admin_addr: SocketAddr,
    /// DNS names sidecars reach the xDS server by (its Service), for its certificate.
    #[arg(long = "xds-name")]
    xds_names: Vec<String>,
    /// Weft's own CA Secret in --namespace (created on first start).
    #[arg(long, default_value = "weft-ca")]
    ca_secret: String,
    /// A `kubernetes.io/tls` Secret in --namespace holding your CA (root or
    /// intermediate with `ca.crt`); used instead of Weft's own when it exists.
    #[arg(long)]
    user_ca_secret: Option<String>,
    /// Name of the leader-election Lease in --namespace.
    #[arg(long, default_value = "weft-controller")]
    lease_name: String,
    /// How long a leader that stops renewing keeps the Lease.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: std::time::Duration,
    /// How a sidecar's xDS stream proves its pod: its ServiceAccount token (TokenReview)
    /// or its peer address.
    #[arg(long, value_enum, default_value_t = ProxyIdentity::Token)]
    proxy_identity: ProxyIdentity,
    /// Where injected sidecars reach the xDS server, HOST:PORT, for the bootstrap
    /// ConfigMap (default: weft-xds.NAMESPACE.svc:15012).
    #[arg(long)]
    sidecar_xds_address: Option<String>,
    /// The webhook's serving certificate and caBundle (`--webhook-*`, `--cluster-domain`,
    /// `--no-webhook-certificate`).
    #[command(flatten)]
    webhook: Box<controller::webhook_cert::WebhookCertArgs>,
    #[command(flatten)]
    mesh: MeshArgs,
}

impl ControllerArgs {
    fn options(self) -> ControllerOptions {
        let sidecar_xds = self
            .sidecar_xds_address
            .clone()
            .unwrap_or_else(|| format!("weft-xds.{}.svc:15012", self.namespace));
        let identity = self.identity.unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| format!("weft-{}", std::process::id()))
        });
        let webhook_certificate = self.webhook.settings();
        ControllerOptions {
            webhook_certificate,
            kubeconfig: self.kubeconfig,
            context: self.context,
            namespace: self.namespace,
            identity,
            xds_addrs: self.xds_addrs,
            admin_addr: self.admin_addr,
            mesh: self.mesh.mesh_config(),
            svid_ttl: self.mesh.svid_ttl,
            require_xds_tls: self.mesh.require_xds_tls,
            xds_names: self.xds_names,
            ca_secret: self.ca_secret,
            user_ca_secret: self.user_ca_secret,
            lease_name: self.lease_name,
            lease_duration: self.lease_duration,
            proxy_identity: self.proxy_identity,
            sidecar_xds,
        }
    }
}

/// Mesh settings every mode takes.
#[derive(Debug, clap::Args)]
struct MeshArgs {
    /// SPIFFE trust domain.
    #[arg(long, default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Inbound mTLS mode of meshed workloads.
    #[arg(long, value_enum, default_value_t = MtlsArg::Strict)]
    mtls: MtlsArg,
    /// Lifetime of workload certificates (renewed at half of it), e.g. 24h, 20s.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    svid_ttl: std::time::Duration,
    /// Refuse plaintext xDS: every sidecar must use a bootstrap made with --ca-file.
    #[arg(long)]
    require_xds_tls: bool,
    /// Authorization: `deny-by-default` enforces SMI TrafficTargets (no TrafficTarget, no
    /// access); `permissive` lets every meshed caller in. A MeshConfig overrides it.
    #[arg(long, value_enum, default_value_t = AccessArg::DenyByDefault)]
    access: AccessArg,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum AccessArg {
    /// Only what TrafficTargets grant (SMI).
    DenyByDefault,
    /// Allow all meshed traffic, still over mutual TLS (for adoption).
    #[value(alias = "allow")]
    Permissive,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum IptablesBackendArg {
    /// Detect: the back end holding Weft's chains, else the busier one, else the default.
    Auto,
    /// `iptables-legacy` / `ip6tables-legacy`.
    Legacy,
    /// `iptables-nft` / `ip6tables-nft`.
    Nft,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum MtlsArg {
    /// Only mutual TLS.
    Strict,
    /// Mutual TLS and plaintext.
    Permissive,
}

impl MeshArgs {
    fn check(&self) -> Result<(), WeftError> {
        if self.svid_ttl < std::time::Duration::from_secs(2) {
            return Err(WeftError::Usage(
                "--svid-ttl must be at least 2s".to_string(),
            ));
        }
        Ok(())
    }
}

impl IdentityArgs {
    fn ca_source(&self) -> Result<CaSource, WeftError> {
        if let (Some(cert), Some(key)) = (&self.ca_cert, &self.ca_key) {
            return Ok(CaSource::Files {
                cert: cert.clone(),
                key: key.clone(),
                chain: self.ca_chain.clone(),
            });
        }
        let dir = match &self.state_dir {
            Some(dir) => dir.clone(),
            None => std::env::var_os("XDG_STATE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
                .ok_or_else(|| {
                    WeftError::Usage("no --state-dir and no HOME to put the CA under".to_string())
                })?
                .join("weft"),
        };
        Ok(CaSource::StateDir(dir))
    }
}

impl MeshArgs {
    fn mesh_config(&self) -> MeshConfig {
        MeshConfig {
            trust_domain: self.trust_domain.clone(),
            mtls: match self.mtls {
                MtlsArg::Strict => MtlsMode::Strict,
                MtlsArg::Permissive => MtlsMode::Permissive,
            },
            access: match self.access {
                AccessArg::Permissive => AccessMode::Permissive,
                AccessArg::DenyByDefault => AccessMode::DenyByDefault,
            },
            ..MeshConfig::default()
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn print_status(status: &MeshStatus) {
    say!(
        "objects: {}  proxies: {}  identity check failures: {}",
        status.objects,
        status.proxies,
        status.identity_check_failures
    );
    let s = &status.settings;
    say!(
        "access: {}  mtls: {}  (from {})  traffic targets: {}",
        s.access,
        s.mtls,
        s.source,
        status.traffic_targets
    );
    if s.access == "deny-by-default" && status.traffic_targets == 0 {
        say!(
            "note: no TrafficTarget grants access, so every call between meshed workloads is denied \
             (add TrafficTargets, or allow all: `weft up --access permissive` or a MeshConfig \
             with `access: Permissive`)"
        );
    }
    if status.problems.is_empty() && status.manifest_errors.is_empty() {
        say!("no invalid objects");
    }
    for p in &status.problems {
        say!("{:<8} {:<40} {}", p.state, p.object, p.reason);
    }
    for e in &status.manifest_errors {
        say!("{:<8} {:<40} {}", "Invalid", e.file.display(), e.reason);
    }
    for r in &status.routes {
        let condition = |(ok, reason): &(bool, String)| {
            format!("{}({reason})", if *ok { "True" } else { "False" })
        };
        say!(
            "{} → parent {}: Accepted={} ResolvedRefs={}{}",
            r.route,
            r.parent,
            condition(&r.accepted),
            condition(&r.resolved_refs),
            if r.message.is_empty() {
                String::new()
            } else {
                format!(": {}", r.message)
            }
        );
    }
}

fn print_proxy_status(proxies: &[ProxyStatus]) {
    say!(
        "{:<32} {:<22} {:<5} {:<5} {:<9} {:>9} {:>9} {:>9} NACK",
        "PROXY",
        "PEER",
        "ADS",
        "TYPE",
        "STATE",
        "RESOURCES",
        "RESPONSES",
        "ACKED"
    );
    let now = std::time::SystemTime::now();
    for p in proxies {
        if let Some(reason) = &p.denied {
            say!("{:<32} {:<22} DENIED: {reason}", p.node, p.peer);
        }
        for t in &p.types {
            say!(
                "{:<32} {:<22} {:<5} {:<5} {:<9} {:>9} {:>9} {:>9} {}",
                p.node,
                p.peer,
                p.protocol,
                t.type_name,
                t.state,
                t.resources,
                t.responses,
                age(t.acked_at.as_deref(), now),
                t.nack.as_deref().unwrap_or("")
            );
        }
    }
}

/// How long ago an RFC 3339 time was, in whole seconds (`-` for none, `?` unreadable).
fn age(at: Option<&str>, now: std::time::SystemTime) -> String {
    let Some(at) = at else {
        return "-".to_string();
    };
    match humantime::parse_rfc3339(at) {
        Ok(at) => {
            let secs = now.duration_since(at).unwrap_or_default().as_secs();
            format!("{secs}s ago")
        }
        Err(_) => "?".to_string(),
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), WeftError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| WeftError::Usage(e.to_string()))?;
    print_text(&format!("{text}\n"))
}

/// Writes `text` to stdout; a reader that went away (`| head`) is not an error.
fn print_text(text: &str) -> Result<(), WeftError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(WeftError::Io {
            path: "<stdout>".into(),
            source: e,
        }),
        _ => Ok(()),
    }
}

async fn run(cli: Cli) -> Result<(), WeftError> {
    match cli.command {
        Command::Up {
            dir,
            xds_addrs,
            admin_addr,
            identity,
        } => {
            raise_open_file_limit();
            identity.mesh.check()?;
            local::run(LocalOptions {
                dir,
                xds_addrs,
                admin_addr,
                ca: identity.ca_source()?,
                extra_trust_bundle: identity.extra_trust_bundle.clone(),
                mesh: identity.mesh.mesh_config(),
                svid_ttl: identity.mesh.svid_ttl,
                require_xds_tls: identity.mesh.require_xds_tls,
            })
            .await
        }
        Command::ControllerAccess => {
            let text = serde_json::to_string_pretty(&controller::access::access_json())
                .map_err(|e| WeftError::Usage(e.to_string()))?;
            say!("{text}");
            Ok(())
        }
        Command::Controller(args) => {
            raise_open_file_limit();
            args.mesh.check()?;
            controller::run(args.options()).await
        }
        Command::Bootstrap {
            pod,
            xds,
            admin_port,
            ca_file,
            trust_domain,
            health_port,
            metrics_port,
            xds_protocol,
            full_stats,
            token_file,
            output,
        } => {
            let (first, more) = xds
                .split_first()
                .ok_or_else(|| WeftError::Usage("--xds is required".to_string()))?;
            let mut opts = BootstrapOptions::parse(&pod, first, admin_port)?;
            for extra in more {
                opts.add_xds(extra)?;
            }
            opts.health_port = health_port;
            opts.metrics_port = metrics_port;
            opts.protocol = xds_protocol;
            opts.full_stats = full_stats;
            opts.token_file = token_file;
            opts.xds_tls = ca_file.map(|ca_file| XdsTls {
                ca_file,
                control_plane_id: crate::runtime::xds_listener::control_plane_id(&trust_domain),
            });
            let yaml = render_bootstrap(&opts)?;
            match output {
                Some(path) => std::fs::write(&path, yaml).map_err(|e| WeftError::io(path, e)),
                None => {
                    print!("{yaml}");
                    Ok(())
                }
            }
        }
        Command::InitIptables {
            proxy_uid,
            outbound_port,
            inbound_port,
            exclude_inbound_ports,
            exclude_outbound_cidrs,
            exclude_outbound_ports,
            remove,
            iptables_backend,
            iptables: program,
        } => {
            // An explicit program wins over the back end choice.
            let choice = match (program, iptables_backend) {
                (Some(program), _) => TablesChoice::Program(program),
                (None, IptablesBackendArg::Auto) => TablesChoice::Auto,
                (None, IptablesBackendArg::Legacy) => TablesChoice::Backend(Backend::Legacy),
                (None, IptablesBackendArg::Nft) => TablesChoice::Backend(Backend::Nft),
            };
            if remove {
                return iptables::remove(&choice);
            }
            iptables::install(
                &RedirectPlan {
                    proxy_uid,
                    outbound_port,
                    inbound_port,
                    exclude_inbound_ports,
                    exclude_outbound_cidrs,
                    exclude_outbound_ports,
                },
                &choice,
            )
        }
        Command::DrainProxy { admin_addr, wait } => {
            let (status, body) = admin::http_request(
                &admin_addr,
                hyper::Method::POST,
                "/drain_listeners?graceful",
            )
            .await?;
            if !status.is_success() {
                return Err(WeftError::Admin {
                    addr: admin_addr,
                    reason: format!("drain: HTTP {status}: {}", String::from_utf8_lossy(&body)),
                });
            }
            tracing::info!(?wait, "proxy draining");
            tokio::time::sleep(wait).await;
            Ok(())
        }
        Command::WaitProxyReady {
            admin_addr,
            timeout,
        } => {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                if let Ok((status, _)) =
                    admin::http_request(&admin_addr, hyper::Method::GET, "/ready").await
                    && status.is_success()
                {
                    return Ok(());
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(WeftError::Admin {
                        addr: admin_addr,
                        reason: format!("proxy not ready after {timeout:?}"),
                    });
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        Command::Status { admin_addr, json } => {
            let status: MeshStatus = admin::fetch(&admin_addr, "/status").await?;
            if json {
                print_json(&status)
            } else {
                print_status(&status);
                Ok(())
            }
        }
        Command::Explain {
            from,
            url,
            method,
            headers,
            admin_addr,
            json,
        } => {
            let query = CallQuery {
                from,
                url,
                method,
                headers,
            };
            let answer: Explanation =
                admin::fetch(&admin_addr, &admin::explain_path(&query)).await?;
            if json {
                return print_json(&answer);
            }
            for line in &answer.lines {
                say!("{line}");
            }
            say!("verdict: {}", answer.verdict);
            Ok(())
        }
        Command::Top {
            namespace,
            window,
            admin_addr,
            json,
        } => {
            if !json {
                // The answer takes the whole window: say so rather than hang silently.
                eprintln!("measuring every sidecar for {window}…");
            }
            let mut params = form_urlencoded::Serializer::new(String::new());
            params.append_pair("window", &window);
            if let Some(ns) = &namespace {
                params.append_pair("namespace", ns);
            }
            let edges: Vec<crate::top::EdgeReport> =
                admin::fetch(&admin_addr, &format!("/top?{}", params.finish())).await?;
            if json {
                return print_json(&edges);
            }
            say!(
                "{:<32} {:<36} {:>8} {:>9} {:>8} {:>8}",
                "SOURCE",
                "DESTINATION",
                "RPS",
                "SUCCESS",
                "P50",
                "P99"
            );
            let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v}ms"));
            for e in &edges {
                say!(
                    "{:<32} {:<36} {:>8.1} {:>8.1}% {:>8} {:>8}",
                    e.source,
                    e.destination,
                    e.rps,
                    e.success_rate,
                    ms(e.p50_ms),
                    ms(e.p99_ms)
                );
            }
            Ok(())
        }
        Command::Check {
            kubeconfig,
            context,
            namespace,
            local,
            pre_install,
            admin_addr,
            prometheus,
            expiry_margin,
            json,
        } => {
            let opts = crate::check::CheckOptions {
                kubeconfig,
                context,
                local,
                namespace,
                admin_addr,
                prometheus,
                pre_install,
                expiry_margin,
            };
            // Each result as it comes: some checks wait on the network.
            let mut progress = |r: &crate::check::CheckResult| {
                if !json {
                    let _ = print_text(&crate::check::render_line(r));
                }
            };
            let results = crate::check::run_checks(&opts, &mut progress).await;
            if json {
                print_json(&results)?;
            }
            crate::check::all_passed(&results)
        }
        Command::Dashboard {
            admin_addr,
            no_open,
        } => {
            // The page must be there before a browser is sent to it.
            let (status, _) =
                admin::http_request(&admin_addr, hyper::Method::GET, "/dashboard").await?;
            if !status.is_success() {
                return Err(WeftError::Admin {
                    addr: admin_addr,
                    reason: format!("/dashboard: HTTP {status}"),
                });
            }
            let url = format!("http://{admin_addr}/dashboard");
            print_text(&format!("{url}\n"))?;
            if !no_open {
                let opened = ["xdg-open", "open"].into_iter().any(|opener| {
                    std::process::Command::new(opener)
                        .arg(&url)
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                        .is_ok()
                });
                if !opened {
                    eprintln!("no xdg-open or open on PATH: open the URL yourself");
                }
            }
            Ok(())
        }
        Command::ProxyConfig {
            pod,
            kinds,
            output,
            admin_addr,
        } => {
            let node = if pod.contains('/') {
                pod
            } else {
                format!("default/{pod}")
            };
            let mut params = form_urlencoded::Serializer::new(String::new());
            params.append_pair("node", &node);
            if !kinds.is_empty() {
                let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
                params.append_pair("types", &names.join(","));
            }
            let config: serde_json::Value =
                admin::fetch(&admin_addr, &format!("/proxy-config?{}", params.finish())).await?;
            match output {
                OutputFormat::Json => print_json(&config),
                OutputFormat::Yaml => {
                    let text = serde_yaml_ng::to_string(&config)
                        .map_err(|e| WeftError::Usage(format!("rendering YAML: {e}")))?;
                    print_text(&text)
                }
            }
        }
        Command::ProxyStatus { admin_addr, json } => {
            let proxies: Vec<ProxyStatus> = admin::fetch(&admin_addr, "/proxy-status").await?;
            if json {
                print_json(&proxies)
            } else {
                print_proxy_status(&proxies);
                Ok(())
            }
        }
    }
}

/// Parses arguments, runs the command, and maps the result to an exit code.
/// Every connected proxy holds a socket: lift the soft limit on open files to the hard
/// one (Go programs get this from their runtime; a low default of 1,024 would refuse
/// the 1,025th proxy).
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open file limit"),
    }
}

/// The name `kubectl` runs a plugin by: `kubectl weft ...` executes `kubectl-weft`.
const KUBECTL_PLUGIN: &str = "kubectl-weft";

pub fn main() -> ExitCode {
    // Installed as the kubectl plugin too (a link named `kubectl-weft`): usage and help
    // then say `kubectl weft`.
    let invoked_as = std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let mut command = <Cli as clap::CommandFactory>::command();
    if invoked_as.as_deref() == Some(KUBECTL_PLUGIN) {
        command = command
            .bin_name("kubectl weft")
            .display_name("kubectl weft");
    }
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: {e}");
            ExitCode::FAILURE
        }
    }
}
