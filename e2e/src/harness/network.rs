//! Pod networking: IP families, the bridge and its gateway, namespaces, hosts files, leftovers.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use super::Harness;
use crate::command::{check, cmd, output};
use crate::error::{Result, io};
use crate::{ADMIN_PORT, XDS_PORT};

/// The address families of a harness's pods and services.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IpFamilies {
    /// IPv4 only (the default).
    #[default]
    V4,
    /// IPv6 only: pods and services have IPv6 addresses alone.
    V6,
    /// Dual-stack, IPv4 primary.
    Dual,
}

impl IpFamilies {
    pub(crate) fn v4(self) -> bool {
        self != Self::V6
    }

    pub(crate) fn v6(self) -> bool {
        self != Self::V4
    }
}

/// Formats `ip:port`, bracketing IPv6.
pub fn host_port(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

impl Harness {
    pub(crate) fn bridge(&self) -> String {
        format!("wftbr{}", self.id)
    }

    pub(crate) fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.id, 1)
    }

    /// The address pods reach the host (the root network namespace) at: where a test
    /// runs what a cluster would run beside the mesh (a collector, say).
    pub fn host_address(&self) -> Ipv4Addr {
        self.gateway()
    }

    fn gateway_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x198, 0x18, u16::from(self.id), 0, 0, 0, 1)
    }

    /// Pods and services added from now on get these address families (call it before
    /// adding any). The bridge gets an IPv6 address when IPv6 is used.
    pub fn use_ip_families(&mut self, families: IpFamilies) -> Result<()> {
        if families.v6() && !self.families.v6() {
            check(cmd(
                "ip",
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{}/64", self.gateway_v6()),
                    "dev",
                    &self.bridge(),
                    "nodad",
                ],
            ))?;
            let bridge = self.bridge();
            check(cmd(
                "ip6tables",
                &[
                    "-w", "-I", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
                ],
            ))?;
            self.forward_rule_v6 = true;
        }
        self.families = families;
        Ok(())
    }

    /// The control plane's admin address.
    pub fn admin_addr(&self) -> String {
        self.admin_override
            .clone()
            .unwrap_or_else(|| format!("{}:{ADMIN_PORT}", self.gateway()))
    }

    pub(crate) fn xds_addr(&self) -> String {
        format!("{}:{XDS_PORT}", self.gateway())
    }

    pub(crate) fn xds_addr_v6(&self) -> String {
        format!("[{}]:{XDS_PORT}", self.gateway_v6())
    }

    pub(crate) fn netns(&self, pod: &str) -> String {
        format!("wft{}-{pod}", self.id)
    }

    pub(crate) fn remove_leftovers(&self) {
        let prefix = format!("wft{}-", self.id);
        if let Ok(out) = output(cmd("ip", &["netns", "list"])) {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or_default();
                if name.starts_with(&prefix) {
                    let _ = output(cmd("ip", &["netns", "del", name]));
                    let _ = fs::remove_dir_all(Path::new("/etc/netns").join(name));
                }
            }
        }
        if let Ok(out) = output(cmd("ip", &["-o", "link", "show"])) {
            let veth_prefix = format!("wv{}p", self.id);
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line
                    .split(": ")
                    .nth(1)
                    .unwrap_or_default()
                    .split('@')
                    .next()
                    .unwrap_or_default();
                if name.starts_with(&veth_prefix) {
                    let _ = output(cmd("ip", &["link", "del", name]));
                }
            }
        }
        let _ = output(cmd("ip", &["link", "del", &self.bridge()]));
        let bridge = self.bridge();
        for program in ["iptables", "ip6tables"] {
            while output(cmd(
                program,
                &[
                    "-w", "-D", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
                ],
            ))
            .is_ok_and(|o| o.status.success())
            {}
        }
    }

    /// `/etc/netns/<pod>/hosts`: what `ip netns exec` shows the pod as /etc/hosts.
    pub(crate) fn write_hosts(&self) -> Result<()> {
        for (name, pod) in &self.pods {
            let dir = Path::new("/etc/netns").join(&pod.netns);
            fs::create_dir_all(&dir).map_err(io(&dir))?;
            let mut hosts = "127.0.0.1 localhost\n::1 localhost\n".to_string();
            for ip in &pod.ips {
                hosts.push_str(&format!("{ip} {name}\n"));
            }
            for (svc, def) in &self.services {
                let ns = &def.namespace;
                for ip in &def.cluster_ips {
                    hosts.push_str(&format!(
                        "{ip} {svc} {svc}.{ns} {svc}.{ns}.svc {svc}.{ns}.svc.cluster.local\n"
                    ));
                }
            }
            let path = dir.join("hosts");
            fs::write(&path, hosts).map_err(io(&path))?;
        }
        Ok(())
    }
}
