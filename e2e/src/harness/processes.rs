//! The processes a harness runs: the test apps, `weft up`, Envoy sidecars, and their log files.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::wait::wait_for;
use super::{Harness, set_mode};
use crate::PROXY_UID;
use crate::command::{check, cmd, output, render};
use crate::error::{HarnessError, Result, io};

impl Harness {
    pub(crate) fn spawn_in(
        &mut self,
        pod: &str,
        what: &str,
        argv: &[&str],
        log: &Path,
    ) -> Result<()> {
        let netns = self.netns(pod);
        let file = fs::File::create(log).map_err(io(log))?;
        let err = file.try_clone().map_err(io(log))?;
        let mut c = cmd("ip", &["netns", "exec", &netns]);
        c.args(argv).stdin(Stdio::null()).stdout(file).stderr(err);
        let line = render(&c);
        let child = c.spawn().map_err(|e| HarnessError::Command {
            command: line,
            reason: e.to_string(),
        })?;
        self.processes.push((format!("{pod}/{what}"), child));
        Ok(())
    }

    /// The control plane's state directory (its CA lives here).
    pub fn state_dir(&self) -> PathBuf {
        self.work.join("state")
    }

    /// Starts `weft up` on the manifest directory and waits until it serves.
    pub fn start_control_plane(&mut self) -> Result<()> {
        self.start_control_plane_with(&[])
    }

    /// Like [`Harness::start_control_plane`], with extra `weft up` flags.
    pub fn start_control_plane_with(&mut self, extra: &[&str]) -> Result<()> {
        self.control_plane_args = extra.iter().map(|s| s.to_string()).collect();
        let log = self.work.join("weft.log");
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(&log))?;
        let err = file.try_clone().map_err(io(&log))?;
        let mut c = Command::new(&self.weft);
        c.arg("up").arg(self.manifests()).args([
            "--xds-addr",
            &self.xds_addr(),
            "--admin-addr",
            &self.admin_addr(),
        ]);
        if self.families.v6() {
            c.args(["--xds-addr", &self.xds_addr_v6()]);
        }
        c.arg("--state-dir")
            .arg(self.state_dir())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err);
        let line = render(&c);
        self.control_plane = Some(c.spawn().map_err(|e| HarnessError::Command {
            command: line,
            reason: e.to_string(),
        })?);
        let admin = self.admin_addr();
        let weft = self.weft.clone();
        wait_for(
            Duration::from_secs(20),
            "weft up to serve its admin endpoint",
            || {
                output(cmd(&weft, &["status", "--admin-addr", &admin]))
                    .is_ok_and(|o| o.status.success())
            },
        )
    }

    /// Stops `weft up` (SIGTERM, as an operator would) and waits for it to exit.
    pub fn stop_control_plane(&mut self) -> Result<()> {
        if let Some(mut cp) = self.control_plane.take() {
            let pid = cp.id().to_string();
            let _ = output(cmd("kill", &["-TERM", &pid]));
            cp.wait().map_err(io(Path::new("weft up")))?;
        }
        Ok(())
    }

    /// Stops and starts `weft up` again with the same flags and state directory.
    pub fn restart_control_plane(&mut self) -> Result<()> {
        self.stop_control_plane()?;
        let args = self.control_plane_args.clone();
        let extra: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_control_plane_with(&extra)
    }

    /// Bootstraps, redirects and starts a real Envoy sidecar in `pod`; waits until it is LIVE.
    pub fn start_sidecar(&mut self, pod: &str) -> Result<()> {
        self.start_sidecar_as(pod, pod)
    }

    /// Like [`Harness::start_sidecar`], but the sidecar claims to be `claimed_pod`.
    pub fn start_sidecar_as(&mut self, pod: &str, claimed_pod: &str) -> Result<()> {
        self.spawn_sidecar(pod, claimed_pod, self.xds_tls)?;
        self.wait_sidecar_live(pod)
    }

    /// Sidecars started from now on connect to xDS over TLS (`weft bootstrap --ca-file`).
    pub fn use_xds_tls(&mut self, on: bool) {
        self.xds_tls = on;
    }

    /// Sidecars started from now on speak this ADS variant (`delta`, the default, or `sotw`).
    pub fn use_xds_protocol(&mut self, protocol: &'static str) {
        self.xds_protocol = protocol;
    }

    /// Starts a sidecar for `pod` claiming `claimed_pod`, without waiting for it: the
    /// bootstrap, the iptables redirect (as the init container would), then Envoy as
    /// the proxy UID.
    pub fn spawn_sidecar(&mut self, pod: &str, claimed_pod: &str, xds_tls: bool) -> Result<()> {
        let bootstrap = self.work.join(format!("{pod}-envoy.yaml"));
        // An IPv6-only pod reaches the control plane over IPv6.
        let xds = if self.pod_ips(pod).iter().any(IpAddr::is_ipv4) {
            self.xds_addr()
        } else {
            self.xds_addr_v6()
        };
        let mut c = Command::new(&self.weft);
        c.args([
            "bootstrap",
            "--pod",
            &format!("{}/{claimed_pod}", self.pod_namespace(claimed_pod)),
            "--xds",
            &xds,
            "--health-port",
            "15021",
            "--metrics-port",
            "15090",
            "--xds-protocol",
            self.xds_protocol,
            "-o",
        ])
        .arg(&bootstrap);
        if xds_tls {
            c.arg("--ca-file").arg(self.state_dir().join("ca-cert.pem"));
        }
        for extra in &self.extra_xds {
            c.args(["--xds", extra]);
        }
        if let Some(dir) = &self.token_dir {
            c.arg("--token-file")
                .arg(dir.join(format!("{claimed_pod}.token")));
        }
        check(c)?;
        self.spawn_envoy(pod, &bootstrap)
    }

    /// Starts an Envoy in `pod` from any bootstrap (a hand-written one, say), behind the
    /// same iptables redirect and as the same UID as a Weft sidecar.
    pub fn spawn_envoy(&mut self, pod: &str, bootstrap: &Path) -> Result<()> {
        set_mode(bootstrap, 0o644)?;
        let netns = self.netns(pod);
        let mut c = cmd("ip", &["netns", "exec", &netns]);
        // The same exemptions the injected init container makes: probe, health and
        // metrics ports.
        c.arg(&self.weft).args([
            "init-iptables",
            "--proxy-uid",
            &PROXY_UID.to_string(),
            "--exclude-inbound-ports",
            "15020,15021,15090",
        ]);
        check(c)?;
        let uid = PROXY_UID.to_string();
        let envoy = self.envoy.to_string_lossy().to_string();
        let boot = bootstrap.to_string_lossy().to_string();
        let log = self.work.join(format!("{pod}-envoy.log"));
        // What the injector puts in the sidecar's environment for the tracer.
        let resource = format!(
            "OTEL_RESOURCE_ATTRIBUTES=service.name={},service.namespace={ns},k8s.namespace.name={ns},k8s.pod.name={pod}",
            self.trace_service_name(pod),
            ns = self.pod_namespace(pod),
        );
        let argv = [
            "env",
            &resource,
            "setpriv",
            "--reuid",
            &uid,
            "--regid",
            &uid,
            "--clear-groups",
            &envoy,
            "-c",
            &boot,
            "--use-dynamic-base-id",
            "--log-level",
            "warn",
            "--drain-time-s",
            "2",
        ];
        self.spawn_in(pod, "envoy", &argv, &log)
    }

    /// Log files of this harness (control plane, apps, sidecars).
    pub fn logs(&self) -> Vec<PathBuf> {
        let mut logs: Vec<PathBuf> = fs::read_dir(&self.work)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        logs
    }
}
