//! Reading state: a sidecar's Envoy admin and stats, the control plane's `weft` views and metrics.

use super::Harness;
use crate::command::{check, cmd};
use crate::error::{HarnessError, Result};

impl Harness {
    /// GETs a path from the Envoy admin endpoint of `pod`'s sidecar.
    pub fn envoy_admin(&self, pod: &str, path: &str) -> Result<String> {
        let app = self.app.to_string_lossy().to_string();
        let url = format!("http://127.0.0.1:15000{path}");
        let out = self.exec_in(pod, &[&app, "get", &url])?;
        if !out.status.success() {
            return Err(HarnessError::Command {
                command: format!("{pod}: GET {url}"),
                reason: String::from_utf8_lossy(&out.stderr).to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// A counter or gauge of `pod`'s sidecar (`/stats`), 0 when absent.
    pub fn envoy_stat(&self, pod: &str, name: &str) -> Result<u64> {
        let stats = self.envoy_admin(pod, "/stats")?;
        Ok(stats
            .lines()
            .filter_map(|l| l.split_once(": "))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0))
    }

    /// `weft proxy-status --json` against this harness's control plane.
    pub fn proxy_status(&self) -> Result<serde_json::Value> {
        self.weft_json("proxy-status")
    }

    /// `weft proxy-config NS/POD KINDS -o json`: what the control plane serves `pod`.
    pub fn proxy_config(&self, pod: &str, kinds: &[&str]) -> Result<serde_json::Value> {
        let admin = self.admin_addr();
        let node = format!("{}/{pod}", self.pod_namespace(pod));
        let mut args = vec!["proxy-config", &node];
        args.extend_from_slice(kinds);
        args.extend(["-o", "json", "--admin-addr", &admin]);
        let out = check(cmd(&self.weft, &args))?;
        serde_json::from_slice(&out.stdout).map_err(|e| HarnessError::Decode {
            what: "proxy-config".to_string(),
            reason: e.to_string(),
        })
    }

    /// `weft top --json --window WINDOW` against this harness's control plane.
    pub fn top(&self, window: &str) -> Result<serde_json::Value> {
        self.weft_json_with("top", &["--window", window])
    }

    /// `weft status --json` against this harness's control plane.
    pub fn status(&self) -> Result<serde_json::Value> {
        self.weft_json("status")
    }

    /// `weft explain --json` for a call from `pod` (namespace default).
    pub fn explain(
        &self,
        pod: &str,
        method: &str,
        url: &str,
        headers: &[&str],
    ) -> Result<serde_json::Value> {
        let from = format!("{}/{pod}", self.pod_namespace(pod));
        let mut args = vec!["--from", &from, url, "-X", method];
        for h in headers {
            args.extend(["-H", h]);
        }
        self.weft_json_with("explain", &args)
    }

    fn weft_json(&self, subcommand: &str) -> Result<serde_json::Value> {
        self.weft_json_with(subcommand, &[])
    }

    fn weft_json_with(&self, subcommand: &str, extra: &[&str]) -> Result<serde_json::Value> {
        let admin = self.admin_addr();
        let mut args = vec![subcommand, "--json", "--admin-addr", &admin];
        args.extend_from_slice(extra);
        let out = check(cmd(&self.weft, &args))?;
        serde_json::from_slice(&out.stdout).map_err(|e| HarnessError::Decode {
            what: subcommand.to_string(),
            reason: e.to_string(),
        })
    }

    /// A GET from outside the mesh (this host, as Prometheus would) to `pod`'s sidecar
    /// metrics port (15090): (status, body).
    pub fn sidecar_metrics_port(&self, pod: &str, path: &str) -> Result<(u64, String)> {
        let ip = self
            .pod_ips(pod)
            .into_iter()
            .next()
            .ok_or_else(|| HarnessError::Command {
                command: format!("sidecar_metrics_port {pod}"),
                reason: "no such pod".into(),
            })?;
        let url = format!("http://{}{path}", std::net::SocketAddr::new(ip, 15090));
        let out = check(cmd(&self.app, &["http", &url]))?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| HarnessError::Decode {
                what: url.clone(),
                reason: e.to_string(),
            })?;
        Ok((
            v["status"].as_u64().unwrap_or(0),
            v["body"].as_str().unwrap_or_default().to_string(),
        ))
    }

    /// One Prometheus sample (`name` without labels) from the control plane's `/metrics`.
    pub fn control_plane_metric(&self, name: &str) -> Result<Option<f64>> {
        let url = format!("http://{}/metrics", self.admin_addr());
        let out = check(cmd(&self.app, &["get", &url]))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.trim().parse().ok()))
    }

    /// The version of `type_name` (`RDS`, ...) that `pod`'s proxy last ACKed.
    pub fn acked_version(&self, pod: &str, type_name: &str) -> Result<Option<String>> {
        let status = self.proxy_status()?;
        let node = format!("{}/{pod}", self.pod_namespace(pod));
        Ok(status
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["node"] == node.as_str())
            .flat_map(|p| p["types"].as_array().cloned().unwrap_or_default())
            .find(|t| t["type"] == type_name && t["state"] == "SYNCED")
            .and_then(|t| t["acked"].as_str().map(str::to_string)))
    }
}
