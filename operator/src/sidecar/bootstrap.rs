//! The Envoy bootstrap of a sidecar: who it is and where its ADS server is.

use std::net::IpAddr;

use serde_json::json;

use crate::error::WeftError;

/// Name of the static cluster that reaches the control plane.
pub const XDS_CLUSTER: &str = "weft-xds";

/// What a sidecar's bootstrap is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapOptions {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Control plane host (IP or DNS name).
    pub xds_host: String,
    /// Control plane port.
    pub xds_port: u16,
    /// More control-plane addresses (replicas without a load-balancing Service in
    /// front), tried in turn when a connection fails.
    pub extra_xds: Vec<(String, u16)>,
    /// Envoy admin port on 127.0.0.1.
    pub admin_port: u16,
    /// Verify the control plane over TLS, when set.
    pub xds_tls: Option<XdsTls>,
    /// Serve `/ready` on 0.0.0.0 at this port, for the kubelet's probes.
    pub health_port: Option<u16>,
    /// Serve Envoy's Prometheus stats (`/stats/prometheus`) and its cluster and endpoint
    /// state (`/weft/clusters`, read by `weft explain`) on 0.0.0.0 at this port.
    pub metrics_port: Option<u16>,
    /// Which ADS variant the sidecar speaks.
    pub protocol: XdsProtocol,
    /// Keep every statistic instead of the mesh's own.
    pub full_stats: bool,
    /// The pod's projected ServiceAccount token, sent on every xDS stream (needs TLS).
    pub token_file: Option<std::path::PathBuf>,
}

/// The ADS variant a sidecar speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum XdsProtocol {
    /// Incremental: only changed resources are sent (Envoy's DELTA_GRPC).
    #[default]
    Delta,
    /// State of the world: every response carries the whole set of a type.
    Sotw,
}

impl XdsProtocol {
    fn api_type(self) -> &'static str {
        match self {
            Self::Delta => "DELTA_GRPC",
            Self::Sotw => "GRPC",
        }
    }
}

/// How a sidecar verifies the control plane on the xDS connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsTls {
    /// PEM root the control plane's certificate chains to.
    pub ca_file: std::path::PathBuf,
    /// The SPIFFE ID the control plane's certificate must carry.
    pub control_plane_id: String,
}

impl BootstrapOptions {
    /// Options for `NAMESPACE/NAME` and `HOST:PORT`.
    pub fn parse(pod: &str, xds: &str, admin_port: u16) -> Result<Self, WeftError> {
        let (namespace, name) = pod
            .split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
            .ok_or_else(|| {
                WeftError::Usage(format!("--pod must be NAMESPACE/NAME, got {pod:?}"))
            })?;
        let (host, port) = parse_host_port(xds)?;
        Ok(Self {
            namespace: namespace.to_string(),
            pod: name.to_string(),
            xds_host: host,
            xds_port: port,
            extra_xds: Vec::new(),
            admin_port,
            xds_tls: None,
            health_port: None,
            metrics_port: None,
            protocol: XdsProtocol::default(),
            full_stats: false,
            token_file: None,
        })
    }

    /// Adds another control-plane address, `HOST:PORT`.
    pub fn add_xds(&mut self, xds: &str) -> Result<(), WeftError> {
        self.extra_xds.push(parse_host_port(xds)?);
        Ok(())
    }

    /// The node id the control plane knows this sidecar by.
    pub fn node_id(&self) -> String {
        format!("{}/{}", self.namespace, self.pod)
    }
}

/// `HOST:PORT` or `[V6]:PORT`.
fn parse_host_port(xds: &str) -> Result<(String, u16), WeftError> {
    xds.rsplit_once(':')
        .and_then(|(h, p)| {
            Some((
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                p.parse::<u16>().ok()?,
            ))
        })
        .filter(|(h, _)| !h.is_empty())
        .ok_or_else(|| WeftError::Usage(format!("--xds must be HOST:PORT, got {xds:?}")))
}

/// Renders the bootstrap as YAML.
pub fn render_bootstrap(opts: &BootstrapOptions) -> Result<String, WeftError> {
    let ads = json!({ "ads": {}, "resource_api_version": "V3" });
    // An IP needs no resolver; a name is resolved (and re-resolved) by Envoy.
    let mut xds_addresses = vec![(opts.xds_host.clone(), opts.xds_port)];
    xds_addresses.extend(opts.extra_xds.iter().cloned());
    let discovery = if xds_addresses
        .iter()
        .all(|(h, _)| h.parse::<IpAddr>().is_ok())
    {
        "STATIC"
    } else {
        "STRICT_DNS"
    };
    let mut bootstrap = json!({
        "node": {
            "id": opts.node_id(),
            "cluster": format!("{}.{}", opts.pod, opts.namespace),
            "metadata": {
                "NAMESPACE": opts.namespace,
                "POD_NAME": opts.pod,
                "WEFT_VERSION": env!("CARGO_PKG_VERSION"),
            },
        },
        "admin": {
            "address": { "socket_address": { "address": "127.0.0.1", "port_value": opts.admin_port } },
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": opts.protocol.api_type(),
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                                // Reconnect within a second of a control-plane restart (Envoy's default
                // backoff grows to 30 s, leaving proxies on old config that long).
                "grpc_services": [ { "envoy_grpc": {
                    "cluster_name": XDS_CLUSTER,
                    "retry_policy": { "retry_back_off": { "base_interval": "0.1s", "max_interval": "1s" } },
                } } ],
            },
            "cds_config": ads,
            "lds_config": ads,
        },
        "static_resources": {
            "clusters": [ {
                "name": XDS_CLUSTER,
                "type": discovery,
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    HTTP_PROTOCOL_OPTIONS: {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {
                            "http2_protocol_options": {
                                "connection_keepalive": { "interval": "30s", "timeout": "5s" },
                            },
                        },
                    },
                },
                "load_assignment": {
                    "cluster_name": XDS_CLUSTER,
                                        "endpoints": [ { "lb_endpoints": xds_addresses.iter().map(|(host, port)| json!(
                        { "endpoint": { "address": { "socket_address": {
                            "address": host, "port_value": port,
                        } } } })).collect::<Vec<_>>() } ],
                },
            } ],
        },
    });
    if let Some(tls) = &opts.xds_tls {
        bootstrap["static_resources"]["clusters"][0]["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": opts.xds_host,
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "validation_context": {
                        "trusted_ca": { "filename": tls.ca_file.to_string_lossy() },
                        "match_typed_subject_alt_names": [
                            { "san_type": "URI", "matcher": { "exact": tls.control_plane_id } },
                        ],
                    },
                },
            },
        });
    }
    if let Some(path) = &opts.token_file {
        if opts.xds_tls.is_none() {
            return Err(WeftError::Usage(
                "--token-file needs --ca-file: the token must not cross the network in the clear"
                    .to_string(),
            ));
        }
        let path = path.to_str().ok_or_else(|| {
            WeftError::Usage(format!(
                "--token-file {} is not valid UTF-8",
                path.display()
            ))
        })?;
        bootstrap["static_resources"]["clusters"][0]["typed_extension_protocol_options"]
            [HTTP_PROTOCOL_OPTIONS]["http_filters"] = token_filters(path);
    }
    if let Some(port) = opts.health_port {
        add_health_listener(&mut bootstrap, port, opts.admin_port);
    }
    if let Some(port) = opts.metrics_port {
        add_metrics_listener(&mut bootstrap, port, opts.admin_port);
    }
    if !opts.full_stats {
        limit_stats(&mut bootstrap);
    }
    serde_yaml_ng::to_string(&bootstrap).map_err(|e| WeftError::Manifest {
        reason: format!("rendering bootstrap: {e}"),
    })
}

const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Sends the token in `TOKEN_PATH` as `authorization: Bearer` on every xDS stream, read
/// when the stream opens, so a token the kubelet rotated is used from the next stream on.
/// Without the file the stream goes out without a token and the control plane says why
/// it refuses the pod's config.
const TOKEN_LUA: &str = r#"local path = TOKEN_PATH
function envoy_on_request(handle)
  local file = io.open(path, "r")
  if file == nil then
    handle:logWarn("weft: cannot read the xDS token file " .. path)
    return
  end
  local token = file:read(65536) or ""
  file:close()
  token = token:match("^%s*(.-)%s*$")
  if token == "" then
    handle:logWarn("weft: the xDS token file " .. path .. " is empty")
    return
  end
  handle:headers():replace("authorization", "Bearer " .. token)
end
"#;

/// Upstream HTTP filters of the xDS cluster that add the pod's token to each stream.
///
/// Envoy's own gRPC client (`envoy_grpc`) only sends static `initial_metadata`. The
/// Google gRPC client can read the token per call (`file_based_metadata`), but Envoy
/// 1.40 reads the xDS retry backoff only from `envoy_grpc`: with it a proxy came back
/// 12 to 23 s after a control-plane restart instead of within a second, and it checks
/// the server's host name instead of its SPIFFE ID. A filter on the xDS cluster keeps
/// `envoy_grpc`, its one-second retry bound and the SPIFFE ID check.
fn token_filters(path: &str) -> serde_json::Value {
    let code = TOKEN_LUA.replacen("TOKEN_PATH", &lua_string(path), 1);
    json!([
        {
            "name": "envoy.filters.http.lua",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": { "inline_string": code },
            },
        },
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec",
            },
        },
    ])
}

/// `text` as a Lua string literal: quotes, backslashes and control bytes escaped.
fn lua_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_ascii_control() => out.push_str(&format!("\\{:03}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Statistics a sidecar keeps: the server's, the managers', the control plane
/// connection's, the inbound side's (requests, RBAC, TLS), and a handful per cluster
/// (requests, response classes, connections, handshakes). Envoy's default keeps
/// about 300 per cluster (385,000 at 1,000 services, a third of the sidecar's memory);
/// these keep 13. Per-cluster stats and clusters themselves are created on first use.
const STAT_PREFIXES: [&str; 9] = [
    "server.",
    "cluster_manager.",
    "listener_manager.",
    "control_plane.",
    "runtime.",
    "cluster.weft-xds.",
    "http.inbound_",
    "listener.0.0.0.0_15006.",
    "listener.[__]_15006.",
];
const STAT_SUFFIXES: [&str; 11] = [
    // Per-cluster latency (the golden signals' duration), circuit-breaker overflows and
    // ejections (why requests fail).
    ".upstream_rq_time",
    ".upstream_rq_pending_overflow",
    ".outlier_detection.ejections_active",
    ".rbac.allowed",
    ".rbac.denied",
    ".ssl.handshake",
    ".downstream_rq_total",
    ".upstream_rq_total",
    ".upstream_cx_total",
    ".upstream_cx_http1_total",
    ".upstream_cx_http2_total",
];

fn limit_stats(bootstrap: &mut serde_json::Value) {
    let mut patterns: Vec<serde_json::Value> = STAT_PREFIXES
        .iter()
        .map(|p| json!({ "prefix": p }))
        .chain(STAT_SUFFIXES.iter().map(|s| json!({ "suffix": s })))
        .collect();
    patterns
        .push(json!({ "safe_regex": { "regex": r".*\.upstream_(rq_[1-5]xx|cx_connect_fail)$" } }));
    bootstrap["stats_config"] =
        json!({ "stats_matcher": { "inclusion_list": { "patterns": patterns } } });
    bootstrap["deferred_stat_options"] = json!({ "enable_deferred_creation_stats": true });
    // Histograms (latency) reach /stats/prometheus at each flush: every second, so a
    // `weft top` window of a few seconds holds fresh quantiles (Envoy's default is 5 s).
    bootstrap["stats_flush_interval"] = json!("1s");
    bootstrap["cluster_manager"] = json!({ "enable_deferred_cluster_creation": true });
}

/// A static listener on 0.0.0.0:`port` passing only `routes` to the admin endpoint,
/// which itself stays on loopback.
fn admin_view_listener(name: &str, port: u16, routes: serde_json::Value) -> serde_json::Value {
    json!({
        "name": name,
        "address": { "socket_address": { "address": "0.0.0.0", "port_value": port } },
        "filter_chains": [ { "filters": [ {
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name.replace('-', "_"),
                "route_config": { "virtual_hosts": [ {
                    "name": name,
                    "domains": ["*"],
                    "routes": routes,
                } ] },
                "http_filters": [ {
                    "name": "envoy.filters.http.router",
                    "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" },
                } ],
            },
        } ] } ],
    })
}

/// Prometheus stats and the clusters' endpoint health (`GET` only: the admin API's
/// mutations stay on loopback).
fn add_metrics_listener(bootstrap: &mut serde_json::Value, port: u16, admin_port: u16) {
    let get = json!([{ "name": ":method", "string_match": { "exact": "GET" } }]);
    let listener = admin_view_listener(
        "weft-metrics",
        port,
        json!([
            { "match": { "path": "/stats/prometheus", "headers": get }, "route": { "cluster": ADMIN_CLUSTER } },
            { "match": { "path": "/weft/clusters", "headers": get },
              "route": { "cluster": ADMIN_CLUSTER, "prefix_rewrite": "/clusters" } },
        ]),
    );
    add_static_listener(bootstrap, listener, admin_port);
}

/// The loopback admin endpoint, as a cluster the static listeners route to.
const ADMIN_CLUSTER: &str = "weft-admin";

fn add_static_listener(
    bootstrap: &mut serde_json::Value,
    listener: serde_json::Value,
    admin_port: u16,
) {
    let statics = &mut bootstrap["static_resources"];
    match statics["listeners"].as_array_mut() {
        Some(listeners) => listeners.push(listener),
        None => statics["listeners"] = json!([listener]),
    }
    let Some(clusters) = statics["clusters"].as_array_mut() else {
        return;
    };
    if clusters.iter().any(|c| c["name"] == ADMIN_CLUSTER) {
        return;
    }
    clusters.push(json!({
        "name": ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": ADMIN_CLUSTER,
            "endpoints": [ { "lb_endpoints": [ { "endpoint": { "address": { "socket_address": {
                "address": "127.0.0.1", "port_value": admin_port,
            } } } } ] } ],
        },
    }));
}

/// A static listener answering `/ready` from the admin endpoint: the kubelet can probe
/// readiness without reaching the admin API.
fn add_health_listener(bootstrap: &mut serde_json::Value, port: u16, admin_port: u16) {
    let listener = admin_view_listener(
        "weft-health",
        port,
        json!([ { "match": { "path": "/ready" }, "route": { "cluster": ADMIN_CLUSTER } } ]),
    );
    add_static_listener(bootstrap, listener, admin_port);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_names_the_pod_and_the_control_plane() {
        let opts = BootstrapOptions::parse("shop/web-1", "198.18.0.1:15010", 15000).unwrap();
        let yaml = render_bootstrap(&opts).unwrap();
        let v: serde_json::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(v["node"]["id"], "shop/web-1");
        assert_eq!(v["node"]["metadata"]["NAMESPACE"], "shop");
        assert_eq!(
            v["admin"]["address"]["socket_address"]["address"],
            "127.0.0.1"
        );
        let cluster = &v["static_resources"]["clusters"][0];
        assert_eq!(cluster["type"], "STATIC");
        let sa = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            ["socket_address"];
        assert_eq!(sa["address"], "198.18.0.1");
        assert_eq!(sa["port_value"], 15010);
        let backoff = &v["dynamic_resources"]["ads_config"]["grpc_services"][0]["envoy_grpc"]["retry_policy"]
            ["retry_back_off"];
        assert_eq!(backoff["max_interval"], "1s", "reconnects within a second");
        assert!(
            v["stats_config"]["stats_matcher"]["inclusion_list"]["patterns"]
                .as_array()
                .is_some_and(|p| p.len() > 5),
            "only the mesh's statistics are kept"
        );
    }

    #[test]
    fn with_a_ca_file_the_control_plane_is_verified_over_tls() {
        let mut opts = BootstrapOptions::parse("shop/web-1", "198.18.0.1:15010", 15000).unwrap();
        let plain: serde_json::Value =
            serde_yaml_ng::from_str(&render_bootstrap(&opts).unwrap()).unwrap();
        assert!(plain["static_resources"]["clusters"][0]["transport_socket"].is_null());
        opts.xds_tls = Some(XdsTls {
            ca_file: "/state/ca-cert.pem".into(),
            control_plane_id: "spiffe://cluster.local/ns/weft-system/sa/weft".into(),
        });
        let v: serde_json::Value =
            serde_yaml_ng::from_str(&render_bootstrap(&opts).unwrap()).unwrap();
        let ctx = &v["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]["common_tls_context"];
        assert_eq!(
            ctx["validation_context"]["trusted_ca"]["filename"],
            "/state/ca-cert.pem"
        );
        assert_eq!(
            ctx["validation_context"]["match_typed_subject_alt_names"][0]["matcher"]["exact"],
            "spiffe://cluster.local/ns/weft-system/sa/weft"
        );
        assert_eq!(ctx["alpn_protocols"][0], "h2");
    }

    fn with_token(path: &str) -> BootstrapOptions {
        let mut opts = BootstrapOptions::parse("shop/web-1", "198.18.0.1:15010", 15000).unwrap();
        opts.xds_tls = Some(XdsTls {
            ca_file: "/state/ca-cert.pem".into(),
            control_plane_id: "spiffe://cluster.local/ns/weft-system/sa/weft".into(),
        });
        opts.token_file = Some(path.into());
        opts
    }

    #[test]
    fn a_token_file_is_sent_on_every_stream_over_verified_tls_with_the_one_second_retry() {
        let v: serde_json::Value = serde_yaml_ng::from_str(
            &render_bootstrap(&with_token("/var/run/secrets/weft/token")).unwrap(),
        )
        .unwrap();
        let cluster = &v["static_resources"]["clusters"][0];
        let filters =
            cluster["typed_extension_protocol_options"][HTTP_PROTOCOL_OPTIONS]["http_filters"]
                .as_array()
                .unwrap();
        assert_eq!(filters.len(), 2);
        assert_eq!(filters[0]["name"], "envoy.filters.http.lua");
        let code = filters[0]["typed_config"]["default_source_code"]["inline_string"]
            .as_str()
            .unwrap();
        assert!(
            code.contains(r#"local path = "/var/run/secrets/weft/token""#),
            "{code}"
        );
        assert!(code.contains(r#""Bearer " .. token"#), "{code}");
        assert_eq!(
            filters[1]["name"], "envoy.filters.http.upstream_codec",
            "the codec ends an upstream filter chain"
        );
        // Still Envoy's own client, so the retry bound and the SPIFFE ID check hold.
        let grpc = &v["dynamic_resources"]["ads_config"]["grpc_services"][0];
        assert!(grpc["google_grpc"].is_null());
        assert_eq!(grpc["envoy_grpc"]["cluster_name"], XDS_CLUSTER);
        assert_eq!(
            grpc["envoy_grpc"]["retry_policy"]["retry_back_off"]["max_interval"],
            "1s"
        );
        let validation = &cluster["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"];
        assert_eq!(validation["trusted_ca"]["filename"], "/state/ca-cert.pem");
        assert_eq!(
            validation["match_typed_subject_alt_names"][0]["matcher"]["exact"],
            "spiffe://cluster.local/ns/weft-system/sa/weft"
        );
        // Without a token file nothing changes.
        let mut plain = with_token("/t");
        plain.token_file = None;
        let plain = render_bootstrap(&plain).unwrap();
        assert!(!plain.contains("http_filters") && !plain.contains("lua"));
    }

    #[test]
    fn a_token_is_never_sent_in_the_clear() {
        let mut opts = with_token("/var/run/secrets/weft/token");
        opts.xds_tls = None;
        let err = render_bootstrap(&opts).unwrap_err().to_string();
        assert!(err.contains("--ca-file"), "{err}");
    }

    #[test]
    fn the_token_path_is_a_lua_string_whatever_it_holds() {
        assert_eq!(lua_string("/var/run/token"), r#""/var/run/token""#);
        assert_eq!(lua_string(r#"/a"b\c"#), r#""/a\"b\\c""#);
        assert_eq!(lua_string("/a\nb\u{7f}"), r#""/a\010b\127""#);
        assert_eq!(lua_string("/é"), "\"/é\"");
    }

    /// The rendered bootstrap with a token, checked by Envoy itself (which also compiles
    /// the Lua): `WEFT_ENVOY`, else the Envoy `make setup` installs.
    #[test]
    fn envoy_accepts_the_bootstrap_with_a_token() {
        let envoy = std::env::var_os("WEFT_ENVOY")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../tools/envoy-1.40.0/envoy/_bin/envoy")
            });
        if !envoy.is_file() {
            panic!(
                "no Envoy at {} (run `make setup`, or set WEFT_ENVOY)",
                envoy.display()
            );
        }
        let dir = std::env::temp_dir().join(format!("weft-bootstrap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        // Envoy loads the trusted CA file when validating: any certificate will do.
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
        let mut opts = with_token(r#"/var/run/secrets/we"ft/token"#);
        opts.xds_tls = Some(XdsTls {
            ca_file: ca,
            control_plane_id: "spiffe://cluster.local/ns/weft-system/sa/weft".into(),
        });
        opts.health_port = Some(15021);
        opts.metrics_port = Some(15090);
        let file = dir.join("envoy.yaml");
        std::fs::write(&file, render_bootstrap(&opts).unwrap()).unwrap();
        let out = std::process::Command::new(&envoy)
            .args(["--mode", "validate", "-c"])
            .arg(&file)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn hostnames_are_resolved_and_bad_arguments_rejected() {
        let opts = BootstrapOptions::parse("a/b", "weft.weft-system.svc:15010", 15000).unwrap();
        assert!(render_bootstrap(&opts).unwrap().contains("STRICT_DNS"));
        assert!(BootstrapOptions::parse("nonamespace", "h:1", 15000).is_err());
        assert!(BootstrapOptions::parse("a/b", "noport", 15000).is_err());
        assert!(BootstrapOptions::parse("a/b", "h:99999", 15000).is_err());
    }

    #[test]
    fn several_control_plane_addresses_are_one_cluster() {
        let mut opts = BootstrapOptions::parse("a/b", "198.18.0.1:15010", 15000).unwrap();
        opts.add_xds("[fd00::1]:15110").unwrap();
        assert!(opts.add_xds("nope").is_err());
        let yaml = render_bootstrap(&opts).unwrap();
        let v: serde_json::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        let cluster = &v["static_resources"]["clusters"][0];
        assert_eq!(cluster["type"], "STATIC", "all addresses are IPs");
        let addresses: Vec<String> = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let a = &e["endpoint"]["address"]["socket_address"];
                format!("{}:{}", a["address"].as_str().unwrap(), a["port_value"])
            })
            .collect();
        assert_eq!(addresses, vec!["198.18.0.1:15010", "fd00::1:15110"]);
        opts.add_xds("weft-xds.weft-system.svc:15012").unwrap();
        assert!(render_bootstrap(&opts).unwrap().contains("STRICT_DNS"));
    }
}
