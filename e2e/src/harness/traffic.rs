//! Traffic from inside a pod: single requests, `weft-e2e-app` clients, load runs.

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::Harness;
use crate::command::{check, cmd, output, render};
use crate::error::{HarnessError, Result};
use crate::report::LoadReport;

impl Harness {
    /// One GET from `pod`: Ok((answering pod, echoed peer identity)) or Err(stderr).
    pub fn get(
        &self,
        pod: &str,
        url: &str,
    ) -> Result<std::result::Result<(String, Option<String>), String>> {
        self.request(pod, "GET", url, &[])
    }

    /// One request from `pod` with a method and `name: value` headers.
    pub fn request(
        &self,
        pod: &str,
        method: &str,
        url: &str,
        headers: &[&str],
    ) -> Result<std::result::Result<(String, Option<String>), String>> {
        let app = self.app.to_string_lossy().to_string();
        let mut argv = vec![app.as_str(), "get", url, "--method", method];
        for h in headers {
            argv.extend(["--header", h]);
        }
        let out = self.exec_in(pod, &argv)?;
        if !out.status.success() {
            return Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut lines = text.lines();
        let body = lines.next().unwrap_or_default().to_string();
        let peer = lines
            .find_map(|l| l.strip_prefix("peer: "))
            .map(str::to_string);
        Ok(Ok((body, peer)))
    }

    /// Runs a `weft-e2e-app` client subcommand in `pod`: Ok(its JSON) when it exits 0,
    /// Err(its stderr) otherwise.
    pub fn app(
        &self,
        pod: &str,
        args: &[&str],
    ) -> Result<std::result::Result<serde_json::Value, String>> {
        let app = self.app.to_string_lossy().to_string();
        let mut argv = vec![app.as_str()];
        argv.extend_from_slice(args);
        let out = self.exec_in(pod, &argv)?;
        if !out.status.success() {
            return Ok(Err(format!(
                "{} {}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            )));
        }
        serde_json::from_slice(&out.stdout)
            .map(Ok)
            .map_err(|e| HarnessError::Decode {
                what: format!("weft-e2e-app {}", args.join(" ")),
                reason: format!("{e}: {}", String::from_utf8_lossy(&out.stdout)),
            })
    }

    /// Runs a command inside a pod's network namespace.
    pub fn exec_in(&self, pod: &str, argv: &[&str]) -> Result<Output> {
        let netns = self.netns(pod);
        let mut c = cmd("ip", &["netns", "exec", &netns]);
        c.args(argv);
        output(c)
    }

    fn load_command(&self, pod: &str, url: &str, limit: &[&str]) -> Command {
        let netns = self.netns(pod);
        let mut c = cmd("ip", &["netns", "exec", &netns]);
        c.arg(&self.app).args(["load", "--url", url]).args(limit);
        c
    }

    /// Sends `count` requests from `pod` to `url` and reports who answered.
    pub fn load(
        &self,
        pod: &str,
        url: &str,
        count: usize,
        concurrency: usize,
    ) -> Result<LoadReport> {
        self.run_load(pod, url, count, concurrency, 0)
    }

    /// Sends `count` requests one at a time, `interval_ms` apart (a fixed rate).
    pub fn load_paced(
        &self,
        pod: &str,
        url: &str,
        count: usize,
        interval_ms: u64,
    ) -> Result<LoadReport> {
        self.run_load(pod, url, count, 1, interval_ms)
    }

    fn run_load(
        &self,
        pod: &str,
        url: &str,
        count: usize,
        concurrency: usize,
        interval_ms: u64,
    ) -> Result<LoadReport> {
        let (count, concurrency, interval) = (
            count.to_string(),
            concurrency.to_string(),
            interval_ms.to_string(),
        );
        let limit = [
            "--count",
            &count,
            "--concurrency",
            &concurrency,
            "--interval-ms",
            &interval,
        ];
        parse_report(check(self.load_command(pod, url, &limit))?)
    }

    /// Starts a load of `duration` in the background (collect it with [`RunningLoad::finish`]).
    pub fn start_load(
        &self,
        pod: &str,
        url: &str,
        duration: Duration,
        concurrency: usize,
    ) -> Result<RunningLoad> {
        let mut c = self.load_command(
            pod,
            url,
            &[
                "--duration-ms",
                &duration.as_millis().to_string(),
                "--concurrency",
                &concurrency.to_string(),
                "--interval-ms",
                "2",
            ],
        );
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let line = render(&c);
        let child = c.spawn().map_err(|e| HarnessError::Command {
            command: line,
            reason: e.to_string(),
        })?;
        Ok(RunningLoad { child: Some(child) })
    }
}

/// A load running in the background.
#[derive(Debug)]
pub struct RunningLoad {
    child: Option<Child>,
}

impl RunningLoad {
    /// Waits for the load to end and returns its report.
    pub fn finish(mut self) -> Result<LoadReport> {
        let child = self.child.take().ok_or_else(|| HarnessError::Decode {
            what: "load".into(),
            reason: "already finished".into(),
        })?;
        let out = child
            .wait_with_output()
            .map_err(|e| HarnessError::Command {
                command: "load".into(),
                reason: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(HarnessError::Command {
                command: "load".into(),
                reason: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
            });
        }
        parse_report(out)
    }
}

impl Drop for RunningLoad {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn parse_report(out: Output) -> Result<LoadReport> {
    serde_json::from_slice(&out.stdout).map_err(|e| HarnessError::Decode {
        what: "load report".into(),
        reason: format!("{e}: {}", String::from_utf8_lossy(&out.stdout)),
    })
}
