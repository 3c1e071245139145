//! Polling until something is ready: a deadline loop, a sidecar turning LIVE, a new xDS ACK.

use std::time::{Duration, Instant};

use super::Harness;
use crate::command::{cmd, output};
use crate::error::{HarnessError, Result};

/// Polls `ready` every 50 ms until it holds; how long that took, or a timeout naming
/// `what`.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    while !ready() {
        if start.elapsed() > timeout {
            return Err(HarnessError::Timeout(timeout, what.to_string()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(start.elapsed())
}

pub(crate) fn wait_for(timeout: Duration, what: &str, ready: impl FnMut() -> bool) -> Result<()> {
    wait_until(timeout, what, ready).map(|_| ())
}

impl Harness {
    /// Waits until `pod`'s sidecar reports LIVE on its admin endpoint.
    pub fn wait_sidecar_live(&self, pod: &str) -> Result<()> {
        let (app, netns) = (self.app.clone(), self.netns(pod));
        wait_for(
            Duration::from_secs(30),
            &format!("the sidecar of {pod} to be LIVE"),
            || {
                let mut c = cmd("ip", &["netns", "exec", &netns]);
                c.arg(&app).args(["get", "http://127.0.0.1:15000/ready"]);
                output(c).is_ok_and(|o| o.status.success())
            },
        )
    }

    /// Waits until `pod`'s proxy has ACKed a `type_name` version other than `old`.
    pub fn wait_for_new_ack(
        &self,
        pod: &str,
        type_name: &str,
        old: Option<&str>,
    ) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = self.acked_version(pod, type_name)?
                && Some(v.as_str()) != old
            {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout(
                    Duration::from_secs(20),
                    format!("{pod} to ACK a new {type_name} version"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
