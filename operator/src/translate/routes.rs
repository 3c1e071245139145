//! Route configurations (RDS): virtual hosts per service port, TrafficSplit weights.

use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster, route,
    route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy;

use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;

use super::envoy::u32_value;
use super::http::no_timeout;
use super::rbac::{path_prefix_regex, request_headers};
use super::settings::MeshConfig;
use super::{outbound_cluster_name, outbound_route_name, treated_as};
use crate::index::{
    AppProtocol, FaultModel, HashModel, HttpRouteEntry, MeshService, PortPolicy, SplitBackend,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{FaultDelay, fault_delay};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
    FaultAbort, HttpFault, fault_abort,
};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};

use super::envoy::any;

/// Backends with a positive weight for one port of a split root, if it is split.
fn weighted_backends(service: &MeshService, port: u16) -> Option<Vec<&SplitBackend>> {
    let backends = service.split.as_ref()?.backends_by_port.get(&port)?;
    Some(backends.iter().filter(|b| b.weight > 0).collect())
}

/// Where the TCP traffic of one service port goes: its own cluster or the split's.
pub fn tcp_destination(service: &MeshService, port: u16) -> tcp_proxy::ClusterSpecifier {
    // Request matches cannot apply to TCP: such a split leaves TCP ports to the root.
    if service
        .split
        .as_ref()
        .is_some_and(|s| !s.matches.is_empty())
    {
        return tcp_proxy::ClusterSpecifier::Cluster(outbound_cluster_name(&service.key, port));
    }
    match weighted_backends(service, port) {
        Some(backends) if backends.len() > 1 => {
            tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster {
                clusters: backends
                    .iter()
                    .map(|b| tcp_proxy::weighted_cluster::ClusterWeight {
                        name: outbound_cluster_name(&b.service, port),
                        weight: b.weight,
                        ..Default::default()
                    })
                    .collect(),
            })
        }
        Some(backends) if backends.len() == 1 => {
            tcp_proxy::ClusterSpecifier::Cluster(outbound_cluster_name(&backends[0].service, port))
        }
        _ => tcp_proxy::ClusterSpecifier::Cluster(outbound_cluster_name(&service.key, port)),
    }
}

/// A route of a table no HTTPRoute decides (SMI or plain), with the port's
/// TrafficPolicy retry and timeout defaults, if any.
fn route(
    name: &str,
    r#match: RouteMatch,
    destination: route_action::ClusterSpecifier,
    policy: Option<&PortPolicy>,
) -> Route {
    let retry = policy.and_then(|p| p.retry.as_ref()).map(|r| &r.value);
    let timeout = policy.and_then(|p| p.timeout.as_ref()).map(|t| t.value);
    Route {
        name: name.to_string(),
        r#match: Some(r#match),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(destination),
            retry_policy: Some(super::gateway::retry_policy(retry, None)),
            timeout: timeout
                .map(super::envoy::protobuf_duration)
                .or_else(no_timeout),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn prefix_all() -> RouteMatch {
    RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_string())),
        ..Default::default()
    }
}

/// The routes of one service port. A split with `matches` (SMI v1alpha4) sends only
/// matching requests to its backends; everything else goes to the root service.
fn service_routes(service: &MeshService, port: u16) -> Vec<Route> {
    // Gateway API producer routes on this port decide everything (a split there gave
    // way); consumer routes are the namespaces' variants (`consumer_route_configs`).
    let policy = service.policies.get(&port);
    let producer = route_entries(service, port, &service.key.namespace, policy);
    if !producer.is_empty() {
        return super::gateway::http_route_routes(&producer);
    }
    let own = route_action::ClusterSpecifier::Cluster(outbound_cluster_name(&service.key, port));
    let Some(split) = service.split.as_ref().filter(|s| !s.matches.is_empty()) else {
        return vec![route(
            "default",
            prefix_all(),
            http_destination(service, port),
            policy,
        )];
    };
    let mut routes: Vec<Route> = split
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let path_specifier = match &m.path_regex {
                Some(regex) => route_match::PathSpecifier::SafeRegex(RegexMatcher {
                    regex: path_prefix_regex(regex),
                    ..Default::default()
                }),
                None => route_match::PathSpecifier::Prefix("/".to_string()),
            };
            let r#match = RouteMatch {
                path_specifier: Some(path_specifier),
                headers: request_headers(m),
                ..Default::default()
            };
            route(
                &format!("split-match-{i}"),
                r#match,
                http_destination(service, port),
                policy,
            )
        })
        .collect();
    routes.push(route("default", prefix_all(), own, policy));
    routes
}

fn http_destination(service: &MeshService, port: u16) -> route_action::ClusterSpecifier {
    match weighted_backends(service, port) {
        Some(backends) if backends.len() > 1 => {
            route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
                clusters: backends
                    .iter()
                    .map(|b| weighted_cluster::ClusterWeight {
                        name: outbound_cluster_name(&b.service, port),
                        weight: Some(u32_value(b.weight)),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        }
        Some(backends) if backends.len() == 1 => route_action::ClusterSpecifier::Cluster(
            outbound_cluster_name(&backends[0].service, port),
        ),
        _ => route_action::ClusterSpecifier::Cluster(outbound_cluster_name(&service.key, port)),
    }
}

/// The Gateway API entries of one port whose route lives in `namespace` (the service's
/// own: producer routes; another: that namespace's consumer routes), in precedence order.
/// Rules that set no retry or timeout take the port's TrafficPolicy defaults.
fn route_entries(
    service: &MeshService,
    port: u16,
    namespace: &str,
    policy: Option<&PortPolicy>,
) -> Vec<HttpRouteEntry> {
    service
        .http_routes
        .get(&port)
        .into_iter()
        .flatten()
        .filter(|e| e.source.namespace == namespace)
        .cloned()
        .map(|mut e| {
            if let Some(p) = policy {
                if e.action.retry.is_none() {
                    e.action.retry = p.retry.as_ref().map(|r| r.value.clone());
                }
                if e.action.timeout.is_none() {
                    e.action.timeout = p.timeout.as_ref().map(|t| t.value);
                }
            }
            e
        })
        .collect()
}

/// A TrafficPolicy's settings on every route of a service port's table: fault injection
/// and the consistent-hash source. (Retry and timeout defaults are set where routes are
/// made: `route` and `route_entries`.)
fn apply_route_policy(routes: &mut [Route], policy: &PortPolicy) {
    for r in routes {
        if let Some(fault) = &policy.fault {
            r.typed_per_filter_config
                .insert(FAULT_FILTER.to_string(), any(&http_fault(&fault.value)));
        }
        let Some(route::Action::Route(action)) = r.action.as_mut() else {
            continue;
        };
        if let Some(hash) = policy
            .load_balancer
            .as_ref()
            .and_then(|l| l.value.hash.as_ref())
        {
            action.hash_policy = vec![hash_policy(hash)];
        }
    }
}

/// The name of Envoy's fault-injection filter, which every outbound connection manager
/// carries (doing nothing) so a route's TrafficPolicy can switch it on.
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";

/// Envoy's fault configuration of a TrafficPolicy's `faultInjection`.
pub fn http_fault(fault: &FaultModel) -> HttpFault {
    let share = |percent: u32| FractionalPercent {
        numerator: percent,
        denominator: fractional_percent::DenominatorType::Hundred as i32,
    };
    HttpFault {
        delay: fault.delay.map(|(percent, d)| FaultDelay {
            percentage: Some(share(percent)),
            fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(
                super::envoy::protobuf_duration(d),
            )),
        }),
        abort: fault.abort.map(|(percent, status)| FaultAbort {
            percentage: Some(share(percent)),
            error_type: Some(fault_abort::ErrorType::HttpStatus(u32::from(status))),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn hash_policy(hash: &HashModel) -> route_action::HashPolicy {
    use route_action::hash_policy;
    route_action::HashPolicy {
        policy_specifier: Some(match hash {
            HashModel::Header(name) => hash_policy::PolicySpecifier::Header(hash_policy::Header {
                header_name: name.clone(),
                ..Default::default()
            }),
            HashModel::Cookie(name) => hash_policy::PolicySpecifier::Cookie(hash_policy::Cookie {
                name: name.clone(),
                ..Default::default()
            }),
            HashModel::SourceIp => hash_policy::PolicySpecifier::ConnectionProperties(
                hash_policy::ConnectionProperties { source_ip: true },
            ),
        }),
        ..Default::default()
    }
}

fn route_config(service: &MeshService, port: u16, mut routes: Vec<Route>) -> RouteConfiguration {
    let name = outbound_route_name(&service.key, port);
    if let Some(policy) = service.policies.get(&port) {
        apply_route_policy(&mut routes, policy);
    }
    RouteConfiguration {
        name: name.clone(),
        // Written by the connection manager to pick this table; not for the app.
        request_headers_to_remove: vec![super::DESTINATION_HEADER.to_string()],
        virtual_hosts: vec![VirtualHost {
            name,
            // Only this service's listeners (its ClusterIPs and port) use this route
            // table: the address a request was sent to decides, whatever its Host says.
            domains: vec!["*".to_string()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The ports of `service` that may carry HTTP and are reached through a listener (none
/// without a ClusterIP).
fn http_ports<'s>(service: &'s MeshService, config: &'s MeshConfig) -> impl Iterator<Item = u16> {
    service
        .ports
        .iter()
        .filter(move |p| {
            !service.cluster_ips.is_empty() && treated_as(p.protocol, config) != AppProtocol::Tcp
        })
        .map(|p| p.port)
}

/// One route configuration per port of `service` that may carry HTTP (none for a
/// service without a ClusterIP: nothing reaches it through a listener).
pub fn service_route_configs(
    service: &MeshService,
    config: &MeshConfig,
) -> Vec<RouteConfiguration> {
    http_ports(service, config)
        .map(|port| route_config(service, port, service_routes(service, port)))
        .collect()
}

/// The variants of `service`'s route configurations for callers in namespaces with
/// consumer routes on it: (caller namespace, configuration), only for the ports that
/// namespace routes, named as the shared configuration they replace for its callers.
/// Its consumer routes decide those ports for them; the producer routes do not apply.
pub fn consumer_route_configs(
    service: &MeshService,
    config: &MeshConfig,
) -> Vec<(String, RouteConfiguration)> {
    let mut out = Vec::new();
    for port in http_ports(service, config) {
        let namespaces: std::collections::BTreeSet<&str> = service
            .http_routes
            .get(&port)
            .into_iter()
            .flatten()
            .map(|e| e.source.namespace.as_str())
            .filter(|ns| *ns != service.key.namespace)
            .collect();
        for ns in namespaces {
            let entries = route_entries(service, port, ns, service.policies.get(&port));
            let routes = super::gateway::http_route_routes(&entries);
            out.push((ns.to_string(), route_config(service, port, routes)));
        }
    }
    out
}
