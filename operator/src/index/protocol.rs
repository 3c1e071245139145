//! Protocol selection for a port, in the order users of Istio and Linkerd expect:
//! the Service port's `appProtocol`, then its name, then a list of well-known
//! server-first or non-HTTP ports, and for everything else detection per connection.

use super::model::{AppProtocol, ProtocolSource};

/// Ports treated as opaque TCP unless declared otherwise: protocols where the server
/// speaks first (SMTP, MySQL, PostgreSQL's SSL request aside) or that are never HTTP
/// (Redis, memcached, Elasticsearch transport, Galera), as Linkerd's defaults.
pub const DEFAULT_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// Protocol names, as `appProtocol` values or port name prefixes. Longer names first,
/// so `grpc-web` is not read as `grpc` with a suffix.
const KNOWN: [(&str, AppProtocol); 27] = [
    ("kubernetes.io/h2c", AppProtocol::Http2),
    ("kubernetes.io/wss", AppProtocol::Tcp),
    ("kubernetes.io/ws", AppProtocol::Http),
    ("grpc-web", AppProtocol::Http),
    ("postgresql", AppProtocol::Tcp),
    ("zookeeper", AppProtocol::Tcp),
    ("memcached", AppProtocol::Tcp),
    ("cassandra", AppProtocol::Tcp),
    ("postgres", AppProtocol::Tcp),
    ("mongodb", AppProtocol::Tcp),
    ("http2", AppProtocol::Http2),
    ("https", AppProtocol::Tcp),
    ("mysql", AppProtocol::Tcp),
    ("mongo", AppProtocol::Tcp),
    ("redis", AppProtocol::Tcp),
    ("kafka", AppProtocol::Tcp),
    ("grpc", AppProtocol::Http2),
    ("http", AppProtocol::Http),
    ("amqp", AppProtocol::Tcp),
    ("mqtt", AppProtocol::Tcp),
    ("nats", AppProtocol::Tcp),
    ("smtp", AppProtocol::Tcp),
    ("h2c", AppProtocol::Http2),
    ("tcp", AppProtocol::Tcp),
    ("tls", AppProtocol::Tcp),
    ("ws", AppProtocol::Http),
    ("wss", AppProtocol::Tcp),
];

fn by_name(name: &str) -> Option<AppProtocol> {
    KNOWN.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
}

/// The protocol of a port named `<protocol>` or `<protocol>-<suffix>`.
fn by_port_name(name: &str) -> Option<AppProtocol> {
    KNOWN
        .iter()
        .filter(|(n, _)| !n.contains('/'))
        .find(|(n, _)| {
            name == *n
                || name
                    .strip_prefix(n)
                    .is_some_and(|rest| rest.starts_with('-'))
        })
        .map(|(_, p)| *p)
}

/// Selects the protocol of a port from what declares it. `ports` are the port numbers
/// the well-known rule looks at (the service port and, when known, the target port);
/// `opaque_ports` the MeshConfig's additions to [`DEFAULT_OPAQUE_PORTS`]. An
/// `appProtocol` Weft does not know falls through to the next rule.
pub fn select_protocol(
    app_protocol: Option<&str>,
    port_name: Option<&str>,
    ports: &[u16],
    opaque_ports: &[u16],
) -> (AppProtocol, ProtocolSource) {
    if let Some(declared) = app_protocol.map(str::to_ascii_lowercase)
        && let Some(protocol) = by_name(&declared)
    {
        return (protocol, ProtocolSource::AppProtocol(declared));
    }
    if let Some(name) = port_name.map(str::to_ascii_lowercase)
        && let Some(protocol) = by_port_name(&name)
    {
        return (protocol, ProtocolSource::PortName(name));
    }
    if ports
        .iter()
        .any(|p| DEFAULT_OPAQUE_PORTS.contains(p) || opaque_ports.contains(p))
    {
        return (AppProtocol::Tcp, ProtocolSource::WellKnownPort);
    }
    (AppProtocol::Detect, ProtocolSource::Undeclared)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn protocol(app: Option<&str>, name: Option<&str>, port: u16) -> AppProtocol {
        select_protocol(app, name, &[port], &[]).0
    }

    #[test]
    fn app_protocol_comes_first_then_the_name_then_the_port() {
        assert_eq!(
            protocol(Some("kubernetes.io/h2c"), Some("tcp"), 80),
            AppProtocol::Http2
        );
        assert_eq!(protocol(Some("GRPC"), None, 80), AppProtocol::Http2);
        assert_eq!(
            protocol(Some("kubernetes.io/ws"), None, 3306),
            AppProtocol::Http
        );
        assert_eq!(
            protocol(Some("kubernetes.io/wss"), None, 80),
            AppProtocol::Tcp
        );
        assert_eq!(protocol(None, Some("mysql"), 8080), AppProtocol::Tcp);
        assert_eq!(protocol(None, Some("redis-cache"), 80), AppProtocol::Tcp);
        assert_eq!(protocol(None, Some("http-web"), 3306), AppProtocol::Http);
        assert_eq!(protocol(None, Some("grpc-web"), 80), AppProtocol::Http);
        assert_eq!(protocol(None, Some("grpc-web-ui"), 80), AppProtocol::Http);
        assert_eq!(protocol(None, Some("grpc-api"), 80), AppProtocol::Http2);
        assert_eq!(protocol(None, Some("https"), 443), AppProtocol::Tcp);
        assert_eq!(protocol(None, Some("http2"), 80), AppProtocol::Http2);
        assert_eq!(protocol(None, None, 3306), AppProtocol::Tcp);
        assert_eq!(protocol(None, Some("db"), 5432), AppProtocol::Tcp);
        assert_eq!(protocol(None, None, 8080), AppProtocol::Detect);
        assert_eq!(protocol(None, Some("web"), 8080), AppProtocol::Detect);
        // A prefix only counts when the suffix is separated by a dash.
        assert_eq!(protocol(None, Some("httpbin"), 8080), AppProtocol::Detect);
        assert_eq!(protocol(None, Some("tcpdump"), 8080), AppProtocol::Detect);
    }

    #[test]
    fn an_unknown_app_protocol_falls_through_and_opaque_ports_extend() {
        assert_eq!(
            select_protocol(Some("example.com/custom"), Some("http"), &[80], &[]),
            (AppProtocol::Http, ProtocolSource::PortName("http".into()))
        );
        assert_eq!(
            select_protocol(None, None, &[7000], &[7000]),
            (AppProtocol::Tcp, ProtocolSource::WellKnownPort)
        );
        assert_eq!(
            select_protocol(None, None, &[80, 6379], &[]).0,
            AppProtocol::Tcp,
            "a well-known target port counts too"
        );
    }
}
