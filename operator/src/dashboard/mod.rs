//! The live mesh page (`/dashboard` on the admin endpoint, `weft dashboard`): the
//! service graph of observed calls, drawn by one self-contained HTML file (inline
//! script and style, no build step, nothing fetched from elsewhere) from `/graph`.

use serde::Serialize;

use crate::top::EdgeReport;

/// The page, embedded in the binary.
pub const PAGE: &str = include_str!("page.html");

/// Edges explained per refresh at most (each is one `weft explain`).
pub const MAX_EDGES: usize = 500;

/// The `weft explain` URL of a destination `namespace/service:port`.
fn explain_url(destination: &str) -> String {
    let (namespace, service_port) = destination
        .split_once('/')
        .unwrap_or(("default", destination));
    let (service, port) = service_port
        .rsplit_once(':')
        .unwrap_or((service_port, "80"));
    format!("http://{service}.{namespace}:{port}/")
}

/// The `weft explain` question for an observed edge: a GET from its caller to its
/// destination.
pub fn edge_query(edge: &EdgeReport) -> crate::explain::CallQuery {
    crate::explain::CallQuery {
        from: edge.source.clone(),
        url: explain_url(&edge.destination),
        ..Default::default()
    }
}

/// A node of the graph.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GraphNode {
    /// `namespace/pod` of a caller, `namespace/service:port` of a destination.
    pub id: String,
    /// `workload` (a calling pod) or `service`.
    pub kind: &'static str,
}

/// An observed call, with what policy says of it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GraphEdge {
    /// The caller's node id.
    pub source: String,
    /// The destination's node id.
    pub destination: String,
    /// Requests per second over the window.
    pub rps: f64,
    /// Share not 5xx, percent.
    pub success_rate: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: Option<f64>,
    /// `weft explain`'s verdict for a GET to the destination (`allowed`, `denied`, ...).
    pub verdict: String,
    /// Whether policy denies the call (drawn as such).
    pub denied: bool,
    /// The explain query for it, for the page's click.
    pub explain: String,
}

/// The graph the page draws.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MeshGraph {
    /// Callers first, then destinations, each sorted.
    pub nodes: Vec<GraphNode>,
    /// By source, then destination.
    pub edges: Vec<GraphEdge>,
}

impl MeshGraph {
    /// The graph of `edges`, the i-th with `verdicts[i]` (`unknown` past its end).
    pub fn new(edges: &[EdgeReport], verdicts: &[String]) -> Self {
        let mut callers = std::collections::BTreeSet::new();
        let mut services = std::collections::BTreeSet::new();
        let mut out = Vec::with_capacity(edges.len());
        for (i, e) in edges.iter().enumerate() {
            callers.insert(e.source.clone());
            services.insert(e.destination.clone());
            let verdict = verdicts.get(i).cloned().unwrap_or_else(|| "unknown".into());
            out.push(GraphEdge {
                source: e.source.clone(),
                destination: e.destination.clone(),
                rps: e.rps,
                success_rate: e.success_rate,
                p99_ms: e.p99_ms,
                denied: verdict == "denied",
                verdict,
                explain: crate::runtime::admin::explain_path(&edge_query(e)),
            });
        }
        out.sort_by(|a, b| (&a.source, &a.destination).cmp(&(&b.source, &b.destination)));
        let nodes = callers
            .into_iter()
            .map(|id| GraphNode {
                id,
                kind: "workload",
            })
            .chain(services.into_iter().map(|id| GraphNode {
                id,
                kind: "service",
            }))
            .collect();
        Self { nodes, edges: out }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(source: &str, destination: &str) -> EdgeReport {
        EdgeReport {
            source: source.into(),
            destination: destination.into(),
            rps: 10.0,
            success_rate: 100.0,
            p50_ms: Some(1.0),
            p99_ms: Some(5.0),
        }
    }

    #[test]
    fn callers_and_services_become_nodes_and_a_denied_verdict_marks_the_edge() {
        let graph = MeshGraph::new(
            &[
                edge("default/client", "default/backend:8080"),
                edge("default/stranger", "default/backend:8080"),
            ],
            &["allowed".into(), "denied".into()],
        );
        let ids: Vec<(&str, &str)> = graph
            .nodes
            .iter()
            .map(|n| (n.id.as_str(), n.kind))
            .collect();
        assert_eq!(
            ids,
            [
                ("default/client", "workload"),
                ("default/stranger", "workload"),
                ("default/backend:8080", "service")
            ]
        );
        assert!(!graph.edges[0].denied);
        assert!(graph.edges[1].denied);
        assert_eq!(
            graph.edges[1].explain,
            "/explain?from=default%2Fstranger&url=http%3A%2F%2Fbackend.default%3A8080%2F"
        );
        assert_eq!(explain_url("shop/web:80"), "http://web.shop:80/");
    }
}
