//! The traffic redirect a sidecar needs, as iptables nat rules in the pod's network
//! namespace: outbound TCP to the outbound capture port, inbound TCP to the inbound
//! capture port, with the proxy's own traffic and loopback left alone.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::error::WeftError;

const CHAIN_INBOUND: &str = "WEFT_INBOUND";
const CHAIN_IN_REDIRECT: &str = "WEFT_IN_REDIRECT";
const CHAIN_OUTPUT: &str = "WEFT_OUTPUT";
const CHAIN_REDIRECT: &str = "WEFT_REDIRECT";

/// The jumps from the built-in chains into Weft's chains.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", CHAIN_INBOUND), ("OUTPUT", CHAIN_OUTPUT)];

/// What to redirect and what to leave alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectPlan {
    /// UID Envoy runs as; its connections are never redirected.
    pub proxy_uid: u32,
    /// Where outbound TCP goes.
    pub outbound_port: u16,
    /// Where inbound TCP goes.
    pub inbound_port: u16,
    /// Inbound ports that reach the pod directly.
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destinations (CIDRs) reached directly.
    pub exclude_outbound_cidrs: Vec<String>,
    /// Outbound destination ports reached directly.
    pub exclude_outbound_ports: Vec<u16>,
}

impl RedirectPlan {
    /// The nat table contents for `iptables-restore --noflush`: Weft's chains only,
    /// declared (so created or flushed) and filled in one atomic step.
    pub fn restore_input(&self) -> String {
        let mut lines = vec!["*nat".to_string()];
        for chain in [
            CHAIN_INBOUND,
            CHAIN_IN_REDIRECT,
            CHAIN_OUTPUT,
            CHAIN_REDIRECT,
        ] {
            lines.push(format!(":{chain} - [0:0]"));
        }
        lines.push(format!(
            "-A {CHAIN_IN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        ));
        lines.push(format!(
            "-A {CHAIN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        ));
        for port in &self.exclude_inbound_ports {
            lines.push(format!(
                "-A {CHAIN_INBOUND} -p tcp --dport {port} -j RETURN"
            ));
        }
        lines.push(format!("-A {CHAIN_INBOUND} -p tcp -j {CHAIN_IN_REDIRECT}"));
        lines.push(format!(
            "-A {CHAIN_OUTPUT} -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        ));
        lines.push(format!("-A {CHAIN_OUTPUT} -d 127.0.0.0/8 -j RETURN"));
        for cidr in &self.exclude_outbound_cidrs {
            lines.push(format!("-A {CHAIN_OUTPUT} -d {cidr} -j RETURN"));
        }
        for port in &self.exclude_outbound_ports {
            lines.push(format!("-A {CHAIN_OUTPUT} -p tcp --dport {port} -j RETURN"));
        }
        lines.push(format!("-A {CHAIN_OUTPUT} -p tcp -j {CHAIN_REDIRECT}"));
        lines.push("COMMIT".to_string());
        lines.join("\n") + "\n"
    }
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<bool, WeftError> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| WeftError::Command {
            command: command.clone(),
            reason: e.to_string(),
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| WeftError::Command {
                command: command.clone(),
                reason: format!("writing rules: {e}"),
            })?;
    }
    let out = child.wait_with_output().map_err(|e| WeftError::Command {
        command: command.clone(),
        reason: e.to_string(),
    })?;
    if out.status.success() {
        return Ok(true);
    }
    // Exit status 1 from `-C`/`-D`/`-F`/`-X` means "no such rule/chain"; the callers decide.
    if out.status.code() == Some(1) && stdin.is_none() {
        return Ok(false);
    }
    Err(WeftError::Command {
        command,
        reason: format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

/// Installs (or updates) the redirect in the current network namespace. Idempotent.
pub fn install(plan: &RedirectPlan, iptables: &str) -> Result<(), WeftError> {
    let restore = format!("{iptables}-restore");
    run(&restore, &["-w", "--noflush"], Some(&plan.restore_input()))?;
    for (builtin, chain) in JUMPS {
        let rule = ["-t", "nat", "-C", builtin, "-p", "tcp", "-j", chain];
        if !run(iptables, &[&["-w"], &rule[..]].concat(), None)? {
            let add = ["-w", "-t", "nat", "-A", builtin, "-p", "tcp", "-j", chain];
            if !run(iptables, &add, None)? {
                return Err(WeftError::Command {
                    command: format!("{iptables} {}", add.join(" ")),
                    reason: "could not add jump".to_string(),
                });
            }
        }
    }
    Ok(())
}

fn chain_exists(iptables: &str, chain: &str) -> Result<bool, WeftError> {
    run(iptables, &["-w", "-t", "nat", "-S", chain], None)
}

/// Removes the redirect from the current network namespace. Idempotent.
pub fn remove(iptables: &str) -> Result<(), WeftError> {
    // Deleting a jump to a chain that does not exist is an error (status 2), not "absent".
    for (builtin, chain) in JUMPS {
        if chain_exists(iptables, chain)? {
            while run(
                iptables,
                &["-w", "-t", "nat", "-D", builtin, "-p", "tcp", "-j", chain],
                None,
            )? {}
        }
    }
    for chain in [
        CHAIN_INBOUND,
        CHAIN_OUTPUT,
        CHAIN_IN_REDIRECT,
        CHAIN_REDIRECT,
    ] {
        if chain_exists(iptables, chain)? {
            run(iptables, &["-w", "-t", "nat", "-F", chain], None)?;
            run(iptables, &["-w", "-t", "nat", "-X", chain], None)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> RedirectPlan {
        RedirectPlan {
            proxy_uid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            exclude_inbound_ports: vec![22],
            exclude_outbound_cidrs: vec!["198.18.0.1/32".into()],
            exclude_outbound_ports: vec![],
        }
    }

    #[test]
    fn proxy_uid_and_loopback_return_before_the_redirect() {
        let rules = plan().restore_input();
        let pos = |needle: &str| {
            rules
                .find(needle)
                .unwrap_or_else(|| panic!("missing {needle}"))
        };
        let redirect = pos("-A WEFT_OUTPUT -p tcp -j WEFT_REDIRECT");
        assert!(pos("--uid-owner 1337 -j RETURN") < redirect);
        assert!(pos("-d 127.0.0.0/8 -j RETURN") < redirect);
        assert!(pos("-d 198.18.0.1/32 -j RETURN") < redirect);
        assert!(pos("--dport 22 -j RETURN") < pos("-A WEFT_INBOUND -p tcp -j WEFT_IN_REDIRECT"));
        assert!(rules.contains("REDIRECT --to-ports 15001"));
        assert!(rules.contains("REDIRECT --to-ports 15006"));
        assert!(rules.ends_with("COMMIT\n"));
    }
}
