//! The traffic redirect a sidecar needs, as iptables nat rules in the pod's network
//! namespace, for IPv4 and IPv6: outbound TCP to the outbound capture port, inbound TCP
//! to the inbound capture port, with the proxy's own traffic and loopback left alone.
//!
//! A pod calling itself follows Istio's scheme. The app's connections over `lo` (to
//! 127.0.0.1 or to its own pod IP) stay direct. The proxy's connections over `lo` to a
//! non-loopback address are its outbound leg reaching its own pod, so they go to the
//! inbound capture port, which terminates mTLS and applies policy, except those from
//! the inbound passthrough source address, which Envoy binds to reach the app directly.
//!
//! Rules go through `iptables-legacy` or `iptables-nft` (see [`choose_backend`]), and
//! the same one is used for both families.

use std::fmt;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};
use std::str::FromStr;

use crate::error::WeftError;

/// The source addresses Envoy's inbound passthrough binds (translate sets its
/// upstream_bind_config): the redirect leaves connections from them alone, and
/// `init-iptables` adds the IPv6 one to `lo`, where it is not by default.
pub use crate::translate::{INBOUND_PASSTHROUGH_SOURCE_V4, INBOUND_PASSTHROUGH_SOURCE_V6};

/// Every chain Weft creates starts with this; `--remove` takes out all of them.
const CHAIN_PREFIX: &str = "WEFT_";
const CHAIN_INBOUND: &str = "WEFT_INBOUND";
const CHAIN_IN_REDIRECT: &str = "WEFT_IN_REDIRECT";
const CHAIN_OUTPUT: &str = "WEFT_OUTPUT";
const CHAIN_REDIRECT: &str = "WEFT_REDIRECT";
const CHAINS: [&str; 4] = [
    CHAIN_INBOUND,
    CHAIN_IN_REDIRECT,
    CHAIN_OUTPUT,
    CHAIN_REDIRECT,
];

/// The jumps from the built-in chains into Weft's chains.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", CHAIN_INBOUND), ("OUTPUT", CHAIN_OUTPUT)];

const LOOPBACK_INTERFACE: &str = "lo";

/// An IP family: its own iptables program, nat table and loopback range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4, through `iptables`.
    V4,
    /// IPv6, through `ip6tables`.
    V6,
}

impl Family {
    /// The loopback range, never redirected.
    pub fn loopback(self) -> Cidr {
        match self {
            Self::V4 => Cidr {
                addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
                prefix: 8,
            },
            Self::V6 => Cidr::host(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        }
    }

    /// The inbound passthrough source address, as a host range.
    pub fn passthrough_source(self) -> Cidr {
        match self {
            Self::V4 => Cidr::host(IpAddr::V4(INBOUND_PASSTHROUGH_SOURCE_V4)),
            Self::V6 => Cidr::host(IpAddr::V6(INBOUND_PASSTHROUGH_SOURCE_V6)),
        }
    }

    /// `iptables` or `ip6tables`: the start of every program name of this family.
    fn program_stem(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// An address range, `ADDR/PREFIX` (a bare address is a host range), host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The range of `prefix` leading bits of `addr`.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, WeftError> {
        let addr = match addr {
            IpAddr::V4(a) if prefix <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) if prefix <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
            _ => {
                return Err(WeftError::Usage(format!(
                    "{addr}/{prefix}: prefix length too long for the address"
                )));
            }
        };
        Ok(Self { addr, prefix })
    }

    /// The range holding just `addr`.
    pub fn host(addr: IpAddr) -> Self {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, prefix }
    }

    /// The family of the range's addresses.
    pub fn family(&self) -> Family {
        if self.addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

impl FromStr for Cidr {
    type Err = WeftError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let invalid = || WeftError::Usage(format!("{s:?} is not an address or CIDR"));
        match s.split_once('/') {
            Some((addr, prefix)) => Self::new(
                addr.parse().map_err(|_| invalid())?,
                prefix.parse().map_err(|_| invalid())?,
            ),
            None => Ok(Self::host(s.parse().map_err(|_| invalid())?)),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What to redirect and what to leave alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectPlan {
    /// UID Envoy runs as; its connections are not redirected, except to its own pod.
    pub proxy_uid: u32,
    /// Where outbound TCP goes.
    pub outbound_port: u16,
    /// Where inbound TCP goes.
    pub inbound_port: u16,
    /// Inbound ports that reach the pod directly.
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destinations reached directly (each goes to its family's table).
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Outbound destination ports reached directly.
    pub exclude_outbound_ports: Vec<u16>,
}

impl RedirectPlan {
    /// The nat table contents of `family` for `iptables-restore --noflush`: Weft's chains
    /// only, declared (so created or flushed) and filled in one atomic step.
    pub fn restore_input(&self, family: Family) -> String {
        let uid = self.proxy_uid;
        let loopback = family.loopback();
        let mut lines = vec!["*nat".to_string()];
        lines.extend(CHAINS.iter().map(|chain| format!(":{chain} - [0:0]")));
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
        // Istio's ISTIO_OUTPUT order; each rule relies on the ones before it.
        // Envoy's inbound passthrough reaches the app at the pod's own address from this
        // source: without this it would loop back into the inbound listener.
        lines.push(format!(
            "-A {CHAIN_OUTPUT} -s {} -o {LOOPBACK_INTERFACE} -j RETURN",
            family.passthrough_source()
        ));
        // The proxy's outbound leg to its own pod: through the inbound listener (mTLS, policy).
        lines.push(format!(
            "-A {CHAIN_OUTPUT} ! -d {loopback} -o {LOOPBACK_INTERFACE} -p tcp -m owner --uid-owner {uid} -j {CHAIN_IN_REDIRECT}"
        ));
        // The app calling its own pod never leaves it: direct, like 127.0.0.1.
        lines.push(format!(
            "-A {CHAIN_OUTPUT} -o {LOOPBACK_INTERFACE} -m owner ! --uid-owner {uid} -j RETURN"
        ));
        lines.push(format!(
            "-A {CHAIN_OUTPUT} -m owner --uid-owner {uid} -j RETURN"
        ));
        lines.push(format!("-A {CHAIN_OUTPUT} -d {loopback} -j RETURN"));
        for cidr in self
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| c.family() == family)
        {
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

/// The nat table input for `iptables-restore --noflush` that deletes `chains` (after the
/// jumps into them are gone): all are flushed first, so references among them do not matter.
fn removal_input(chains: &[String]) -> String {
    let mut lines = vec!["*nat".to_string()];
    lines.extend(chains.iter().map(|chain| format!(":{chain} - [0:0]")));
    lines.extend(chains.iter().map(|chain| format!("-X {chain}")));
    lines.push("COMMIT".to_string());
    lines.join("\n") + "\n"
}

/// In an `iptables-save -t nat` dump: the jumps from other chains into Weft's chains (as
/// arguments after `-A`, for `-D`) and Weft's chains.
fn weft_rules_in(save: &str) -> (Vec<Vec<String>>, Vec<String>) {
    let mut jumps = Vec::new();
    let mut chains = Vec::new();
    for line in save.lines() {
        if let Some(chain) = line
            .strip_prefix(':')
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|chain| chain.starts_with(CHAIN_PREFIX))
        {
            chains.push(chain.to_string());
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let args: Vec<String> = rule.split_whitespace().map(str::to_string).collect();
            let from_weft = args.first().is_some_and(|c| c.starts_with(CHAIN_PREFIX));
            let to_weft = args
                .windows(2)
                .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1].starts_with(CHAIN_PREFIX));
            if to_weft && !from_weft {
                jumps.push(args);
            }
        }
    }
    (jumps, chains)
}

/// An iptables implementation: the kernel's legacy xtables, or nf_tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-legacy`.
    Legacy,
    /// `iptables-nft`.
    Nft,
}

impl Backend {
    /// The one that is not this one.
    pub fn other(self) -> Self {
        match self {
            Self::Legacy => Self::Nft,
            Self::Nft => Self::Legacy,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Legacy => "legacy",
            Self::Nft => "nft",
        })
    }
}

/// How `init-iptables` picks its iptables programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TablesChoice {
    /// Detect the back end (see [`choose_backend`]); fall back to the other if it does not work.
    Auto,
    /// `iptables-<backend>` and `ip6tables-<backend>`.
    Backend(Backend),
    /// This program for IPv4 (with its `-restore` and `-save` siblings) and its
    /// [`ip6tables_sibling`] for IPv6.
    Program(String),
}

/// One family's programs: `iptables` and its `-restore` and `-save` siblings.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Programs {
    family: Family,
    iptables: String,
}

impl Programs {
    fn of_backend(backend: Backend, family: Family) -> Self {
        Self {
            family,
            iptables: format!("{}-{backend}", family.program_stem()),
        }
    }

    fn restore(&self) -> String {
        format!("{}-restore", self.iptables)
    }

    fn save(&self) -> String {
        format!("{}-save", self.iptables)
    }
}

/// The programs of one run: IPv6's are absent when they cannot be derived from `--iptables`.
#[derive(Clone, Debug)]
struct Tables {
    v4: Programs,
    v6: Option<Programs>,
}

impl Tables {
    fn of_backend(backend: Backend) -> Self {
        Self {
            v4: Programs::of_backend(backend, Family::V4),
            v6: Some(Programs::of_backend(backend, Family::V6)),
        }
    }

    fn of_program(program: &str) -> Self {
        Self {
            v4: Programs {
                family: Family::V4,
                iptables: program.to_string(),
            },
            v6: ip6tables_sibling(program).map(|iptables| Programs {
                family: Family::V6,
                iptables,
            }),
        }
    }
}

/// The `ip6tables` counterpart of an `iptables` program: same directory, `ip6tables` in
/// place of the leading `iptables` of the file name (`/sbin/iptables-legacy` gives
/// `/sbin/ip6tables-legacy`); `None` for other names.
pub fn ip6tables_sibling(program: &str) -> Option<String> {
    let (dir, name) = match program.rsplit_once('/') {
        Some((dir, name)) => (format!("{dir}/"), name),
        None => (String::new(), program),
    };
    name.strip_prefix("iptables")
        .map(|rest| format!("{dir}ip6tables{rest}"))
}

/// What a back end's `-save` dumps (both families together) show in this namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendState {
    /// One of Weft's chains exists.
    pub weft_chains: bool,
    /// Rules (`-A` lines) in all tables.
    pub rules: usize,
}

impl BackendState {
    /// Reads `iptables-save`-format dumps.
    pub fn from_saves<'a>(saves: impl IntoIterator<Item = &'a str>) -> Self {
        let mut state = Self::default();
        for line in saves.into_iter().flat_map(str::lines) {
            if line.starts_with("-A ") {
                state.rules += 1;
            } else if line
                .strip_prefix(':')
                .is_some_and(|chain| chain.starts_with(CHAIN_PREFIX))
            {
                state.weft_chains = true;
            }
        }
        state
    }
}

/// The system's default back end from `iptables --version` output: `(nf_tables)` is nft,
/// `(legacy)` or no mark (before 1.8 there was only legacy) is legacy; no `iptables` at
/// all (`None`) counts as nft, as kube's iptables-wrapper defaults.
pub fn system_default(version: Option<&str>) -> Backend {
    match version {
        Some(v) if v.contains("(nf_tables)") => Backend::Nft,
        Some(v) if v.contains("iptables") => Backend::Legacy,
        _ => Backend::Nft,
    }
}

/// The back end auto detection picks, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detection {
    /// The pick.
    pub backend: Backend,
    /// Why, for the log.
    pub reason: String,
}

/// Auto detection, after Istio's and kube's iptables-wrapper: the back end that already
/// holds Weft's chains (so a rerun or `--remove` works on the same rules), else the one
/// with more rules in this namespace (rules in the other would run first or be bypassed),
/// else the system default.
pub fn choose_backend(legacy: BackendState, nft: BackendState, default: Backend) -> Detection {
    let pick = |backend, reason: String| Detection { backend, reason };
    match (legacy.weft_chains, nft.weft_chains) {
        (true, false) => return pick(Backend::Legacy, "it holds Weft's chains".to_string()),
        (false, true) => return pick(Backend::Nft, "it holds Weft's chains".to_string()),
        _ => {}
    }
    let both = if legacy.weft_chains {
        "both hold Weft's chains; "
    } else {
        ""
    };
    let counts = format!("{} rules in legacy, {} in nft", legacy.rules, nft.rules);
    if legacy.rules > nft.rules {
        pick(
            Backend::Legacy,
            format!("{both}it has more rules ({counts})"),
        )
    } else if nft.rules > legacy.rules {
        pick(Backend::Nft, format!("{both}it has more rules ({counts})"))
    } else {
        pick(
            default,
            format!("{both}it is the system default (`iptables --version`; {counts})"),
        )
    }
}

/// What a finished command printed.
#[derive(Debug)]
struct Finished {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn failure(&self, command: String) -> WeftError {
        WeftError::Command {
            command,
            reason: format!("{}: {}", self.status, self.stderr.trim()),
        }
    }
}

fn command_line(program: &str, args: &[&str]) -> String {
    format!("{program} {}", args.join(" "))
}

/// Runs `program`; only a failure to start it (or to feed it `stdin`) is an error.
fn exec(program: &str, args: &[&str], stdin: Option<&str>) -> Result<Finished, WeftError> {
    let command = command_line(program, args);
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => WeftError::MissingProgram {
                program: program.to_string(),
                purpose: "the traffic redirect",
            },
            _ => WeftError::Command {
                command: command.clone(),
                reason: e.to_string(),
            },
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
    Ok(Finished {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `program` and requires success.
fn check(program: &str, args: &[&str], stdin: Option<&str>) -> Result<Finished, WeftError> {
    let done = exec(program, args, stdin)?;
    if done.status.success() {
        Ok(done)
    } else {
        Err(done.failure(command_line(program, args)))
    }
}

/// Whether `programs` can use the nat table in this kernel; why not otherwise.
fn probe(programs: &Programs) -> Result<(), String> {
    let args = ["-w", "-t", "nat", "-S", "OUTPUT"];
    match exec(&programs.iptables, &args, None) {
        Ok(done) if done.status.success() => Ok(()),
        Ok(done) => Err(done.stderr.trim().to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// The back end's `-save` dumps of both families; a program that fails counts as empty.
fn observe(backend: Backend) -> BackendState {
    let saves: Vec<String> = [Family::V4, Family::V6]
        .into_iter()
        .filter_map(|family| {
            // All tables, not `-t nat`: legacy would create a missing table just to list it.
            exec(&Programs::of_backend(backend, family).save(), &[], None)
                .ok()
                .filter(|done| done.status.success())
                .map(|done| done.stdout)
        })
        .collect();
    BackendState::from_saves(saves.iter().map(String::as_str))
}

/// Auto detection against this namespace and kernel, logged.
fn detect() -> Result<Backend, WeftError> {
    let (legacy, nft) = (observe(Backend::Legacy), observe(Backend::Nft));
    let version = exec("iptables", &["--version"], None)
        .ok()
        .filter(|done| done.status.success())
        .map(|done| done.stdout);
    let detection = choose_backend(legacy, nft, system_default(version.as_deref()));
    let chosen = detection.backend;
    let Err(chosen_fails) = probe(&Programs::of_backend(chosen, Family::V4)) else {
        tracing::info!(
            backend = %chosen,
            "iptables back end: iptables-{chosen}, because {}",
            detection.reason
        );
        return Ok(chosen);
    };
    let other = chosen.other();
    match probe(&Programs::of_backend(other, Family::V4)) {
        Ok(()) => {
            tracing::warn!(
                backend = %other,
                "iptables back end: iptables-{other}, because iptables-{chosen} (picked as {}) \
                 does not work here: {chosen_fails}",
                detection.reason
            );
            Ok(other)
        }
        Err(other_fails) => Err(WeftError::Command {
            command: "iptables back end detection".to_string(),
            reason: format!(
                "neither back end works here: iptables-{chosen}: {chosen_fails}; \
                 iptables-{other}: {other_fails}"
            ),
        }),
    }
}

/// The programs `choice` names for installing, logged.
fn tables_to_install(choice: &TablesChoice) -> Result<Tables, WeftError> {
    match choice {
        TablesChoice::Auto => Ok(Tables::of_backend(detect()?)),
        TablesChoice::Backend(backend) => {
            tracing::info!(
                backend = %backend,
                "iptables back end: iptables-{backend}, because --iptables-backend says so"
            );
            Ok(Tables::of_backend(*backend))
        }
        TablesChoice::Program(program) => {
            tracing::info!(
                program = %program,
                "iptables program: {program}, because --iptables overrides --iptables-backend"
            );
            Ok(Tables::of_program(program))
        }
    }
}

/// Whether IPv6 gets the redirect in this namespace.
#[derive(Debug)]
enum Ipv6Status {
    /// Yes, with these programs.
    Available(Programs),
    /// No: IPv6 cannot carry traffic here.
    Off(String),
    /// No, although IPv6 may carry traffic here.
    Unusable(String),
}

fn ipv6_status(v6: Option<&Programs>, v4: &Programs) -> Ipv6Status {
    let sysctl = std::path::Path::new("/proc/sys/net/ipv6/conf");
    if !sysctl.exists() {
        return Ipv6Status::Off("the kernel has no IPv6".to_string());
    }
    for scope in ["all", LOOPBACK_INTERFACE] {
        let path = sysctl.join(scope).join("disable_ipv6");
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
            return Ipv6Status::Off(format!(
                "IPv6 is disabled in this namespace (net.ipv6.conf.{scope}.disable_ipv6 = 1)"
            ));
        }
    }
    let Some(v6) = v6 else {
        return Ipv6Status::Unusable(format!(
            "no ip6tables counterpart of --iptables {} (name it iptables*)",
            v4.iptables
        ));
    };
    match probe(v6) {
        Ok(()) => Ipv6Status::Available(v6.clone()),
        Err(reason) => Ipv6Status::Unusable(format!(
            "no usable ip6tables nat table ({}: {reason})",
            v6.iptables
        )),
    }
}

/// Installs (or updates) the redirect of one family. Idempotent.
fn install_family(plan: &RedirectPlan, programs: &Programs) -> Result<(), WeftError> {
    let rules = plan.restore_input(programs.family);
    check(&programs.restore(), &["-w", "--noflush"], Some(&rules))?;
    for (builtin, chain) in JUMPS {
        let jump = ["-p", "tcp", "-j", chain];
        let present = exec(
            &programs.iptables,
            &[&["-w", "-t", "nat", "-C", builtin][..], &jump].concat(),
            None,
        )?;
        // Status 1 from `-C` is "no such rule"; anything else is a real failure.
        match present.status.code() {
            Some(0) => {}
            Some(1) => {
                check(
                    &programs.iptables,
                    &[&["-w", "-t", "nat", "-A", builtin][..], &jump].concat(),
                    None,
                )?;
            }
            _ => {
                return Err(present.failure(command_line(
                    &programs.iptables,
                    &[&["-w", "-t", "nat", "-C", builtin][..], &jump].concat(),
                )));
            }
        }
    }
    tracing::info!(family = %programs.family, "redirect installed with {}", programs.iptables);
    Ok(())
}

/// Removes one family's jumps into Weft's chains and the chains. Idempotent.
fn remove_family(programs: &Programs) -> Result<(), WeftError> {
    let save = check(&programs.save(), &["-t", "nat"], None)?;
    let (jumps, chains) = weft_rules_in(&save.stdout);
    for jump in &jumps {
        let args: Vec<&str> = ["-w", "-t", "nat", "-D"]
            .into_iter()
            .chain(jump.iter().map(String::as_str))
            .collect();
        check(&programs.iptables, &args, None)?;
    }
    if !chains.is_empty() {
        check(
            &programs.restore(),
            &["-w", "--noflush"],
            Some(&removal_input(&chains)),
        )?;
    }
    tracing::info!(
        family = %programs.family,
        "removed {} jumps and {} chains with {}",
        jumps.len(),
        chains.len(),
        programs.iptables
    );
    Ok(())
}

const IP: &str = "ip";
const PASSTHROUGH_V6_PURPOSE: &str =
    "adding ::6/128 to lo (the IPv6 inbound passthrough source); install iproute2";

fn passthrough_source_v6() -> String {
    Family::V6.passthrough_source().to_string()
}

/// Whether `::6` is on `lo`.
fn passthrough_source_v6_on_lo() -> Result<bool, WeftError> {
    let source = passthrough_source_v6();
    let args = [
        "-6",
        "-o",
        "addr",
        "show",
        "dev",
        LOOPBACK_INTERFACE,
        "to",
        &source,
    ];
    let done = check(IP, &args, None).map_err(|e| match e {
        WeftError::MissingProgram { program, .. } => WeftError::MissingProgram {
            program,
            purpose: PASSTHROUGH_V6_PURPOSE,
        },
        e => e,
    })?;
    Ok(!done.stdout.trim().is_empty())
}

/// Puts `::6` on `lo`, where Envoy can bind it. Idempotent.
fn add_passthrough_source_v6() -> Result<(), WeftError> {
    if !passthrough_source_v6_on_lo()? {
        let source = passthrough_source_v6();
        check(
            IP,
            &["-6", "addr", "add", &source, "dev", LOOPBACK_INTERFACE],
            None,
        )?;
        tracing::info!("added {source} to {LOOPBACK_INTERFACE} (IPv6 inbound passthrough source)");
    }
    Ok(())
}

/// Takes `::6` off `lo`. Idempotent; without `ip` there is nothing Weft could have added.
fn remove_passthrough_source_v6() -> Result<(), WeftError> {
    match passthrough_source_v6_on_lo() {
        Ok(true) => {
            let source = passthrough_source_v6();
            check(
                IP,
                &["-6", "addr", "del", &source, "dev", LOOPBACK_INTERFACE],
                None,
            )?;
            tracing::info!("removed {source} from {LOOPBACK_INTERFACE}");
            Ok(())
        }
        Ok(false) | Err(WeftError::MissingProgram { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Installs (or updates) the redirect in the current network namespace, IPv4 and, where
/// the namespace has it, IPv6. Idempotent.
pub fn install(plan: &RedirectPlan, choice: &TablesChoice) -> Result<(), WeftError> {
    let tables = tables_to_install(choice)?;
    install_family(plan, &tables.v4)?;
    match ipv6_status(tables.v6.as_ref(), &tables.v4) {
        Ipv6Status::Available(v6) => {
            // Without `ip` only IPv6 connections to ports no Service declares fail;
            // refusing to start the pod over that would be worse.
            match add_passthrough_source_v6() {
                Err(WeftError::MissingProgram { program, purpose }) => tracing::warn!(
                    "{program} not found ({purpose}): IPv6 connections to pod ports no Service declares will fail"
                ),
                other => other?,
            }
            install_family(plan, &v6)?;
        }
        Ipv6Status::Off(reason) => tracing::info!("IPv6 redirect skipped: {reason}"),
        Ipv6Status::Unusable(reason) => {
            tracing::warn!("IPv6 redirect skipped, IPv6 TCP is not captured: {reason}");
        }
    }
    Ok(())
}

/// Removes the redirect (both families) from the current network namespace. Idempotent.
/// `Auto` cleans every back end that holds Weft's chains.
pub fn remove(choice: &TablesChoice) -> Result<(), WeftError> {
    let targets: Vec<Tables> = match choice {
        TablesChoice::Auto => {
            let holders: Vec<Backend> = [Backend::Legacy, Backend::Nft]
                .into_iter()
                .filter(|backend| observe(*backend).weft_chains)
                .collect();
            if holders.is_empty() {
                tracing::info!("no Weft chains in iptables-legacy or iptables-nft");
            }
            for backend in &holders {
                tracing::info!(backend = %backend, "removing from iptables-{backend}: it holds Weft's chains");
            }
            holders.into_iter().map(Tables::of_backend).collect()
        }
        TablesChoice::Backend(backend) => vec![Tables::of_backend(*backend)],
        TablesChoice::Program(program) => vec![Tables::of_program(program)],
    };
    for tables in &targets {
        remove_family(&tables.v4)?;
        if let Some(v6) = &tables.v6 {
            // Without a usable ip6tables no IPv6 rules can have been installed with it.
            match exec(&v6.save(), &["-t", "nat"], None) {
                Ok(done) if done.status.success() => remove_family(v6)?,
                Ok(done) => tracing::info!("IPv6: nothing to remove ({})", done.stderr.trim()),
                Err(e) => tracing::info!("IPv6: nothing to remove ({e})"),
            }
        }
    }
    remove_passthrough_source_v6()
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
            exclude_outbound_cidrs: vec![
                "198.18.0.1/32".parse().unwrap(),
                "fd00:10::/64".parse().unwrap(),
            ],
            exclude_outbound_ports: vec![5432],
        }
    }

    fn output_rules(rules: &str) -> Vec<&str> {
        rules
            .lines()
            .filter(|l| l.starts_with("-A WEFT_OUTPUT "))
            .collect()
    }

    #[test]
    fn ipv4_output_chain_is_istios_order() {
        assert_eq!(
            output_rules(&plan().restore_input(Family::V4)),
            [
                "-A WEFT_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
                "-A WEFT_OUTPUT ! -d 127.0.0.0/8 -o lo -p tcp -m owner --uid-owner 1337 -j WEFT_IN_REDIRECT",
                "-A WEFT_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
                "-A WEFT_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A WEFT_OUTPUT -d 127.0.0.0/8 -j RETURN",
                "-A WEFT_OUTPUT -d 198.18.0.1/32 -j RETURN",
                "-A WEFT_OUTPUT -p tcp --dport 5432 -j RETURN",
                "-A WEFT_OUTPUT -p tcp -j WEFT_REDIRECT",
            ]
        );
    }

    #[test]
    fn ipv6_output_chain_uses_ipv6_loopback_and_passthrough_source() {
        assert_eq!(
            output_rules(&plan().restore_input(Family::V6)),
            [
                "-A WEFT_OUTPUT -s ::6/128 -o lo -j RETURN",
                "-A WEFT_OUTPUT ! -d ::1/128 -o lo -p tcp -m owner --uid-owner 1337 -j WEFT_IN_REDIRECT",
                "-A WEFT_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
                "-A WEFT_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A WEFT_OUTPUT -d ::1/128 -j RETURN",
                "-A WEFT_OUTPUT -d fd00:10::/64 -j RETURN",
                "-A WEFT_OUTPUT -p tcp --dport 5432 -j RETURN",
                "-A WEFT_OUTPUT -p tcp -j WEFT_REDIRECT",
            ]
        );
    }

    #[test]
    fn both_families_declare_the_chains_and_redirect_inbound() {
        for family in [Family::V4, Family::V6] {
            let rules = plan().restore_input(family);
            assert!(rules.starts_with(
                "*nat\n:WEFT_INBOUND - [0:0]\n:WEFT_IN_REDIRECT - [0:0]\n:WEFT_OUTPUT - [0:0]\n:WEFT_REDIRECT - [0:0]\n"
            ));
            let inbound: Vec<&str> = rules
                .lines()
                .filter(|l| l.starts_with("-A WEFT_IN"))
                .collect();
            assert_eq!(
                inbound,
                [
                    "-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
                    "-A WEFT_INBOUND -p tcp --dport 22 -j RETURN",
                    "-A WEFT_INBOUND -p tcp -j WEFT_IN_REDIRECT",
                ]
            );
            assert!(rules.contains("-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n"));
            assert!(rules.ends_with("COMMIT\n"));
        }
    }

    #[test]
    fn excluded_cidrs_go_to_the_table_of_their_family() {
        let v4 = plan().restore_input(Family::V4);
        let v6 = plan().restore_input(Family::V6);
        assert!(v4.contains("198.18.0.1/32") && !v4.contains("fd00:10::/64"));
        assert!(v6.contains("fd00:10::/64") && !v6.contains("198.18.0.1/32"));
    }

    #[test]
    fn passthrough_constants_match_the_rules() {
        assert_eq!(INBOUND_PASSTHROUGH_SOURCE_V4.to_string(), "127.0.0.6");
        assert_eq!(INBOUND_PASSTHROUGH_SOURCE_V6.to_string(), "::6");
    }

    #[test]
    fn cidrs_parse_per_family_with_host_bits_cleared() {
        let parse = |s: &str| s.parse::<Cidr>().map(|c| (c.to_string(), c.family()));
        assert_eq!(
            parse("10.1.2.3/8").unwrap(),
            ("10.0.0.0/8".into(), Family::V4)
        );
        assert_eq!(
            parse(" 198.18.0.1 ").unwrap(),
            ("198.18.0.1/32".into(), Family::V4)
        );
        assert_eq!(
            parse("fd00::1/64").unwrap(),
            ("fd00::/64".into(), Family::V6)
        );
        assert_eq!(parse("::/0").unwrap(), ("::/0".into(), Family::V6));
        assert_eq!(
            parse("0.0.0.0/0").unwrap(),
            ("0.0.0.0/0".into(), Family::V4)
        );
        for bad in ["", "10.0.0.0/33", "fd00::/129", "nope/8", "10.0.0.0/x"] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    const LEGACY_SAVE_WITH_WEFT: &str = "\
# Generated by iptables-save v1.8.9 on Mon Nov 30 05:57:01 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:WEFT_INBOUND - [0:0]
:WEFT_OUTPUT - [0:0]
-A PREROUTING -p tcp -j WEFT_INBOUND
-A OUTPUT -p tcp -j WEFT_OUTPUT
-A WEFT_INBOUND -p tcp -j WEFT_IN_REDIRECT
COMMIT
";

    const NFT_SAVE_FIREWALL: &str = "\
# Generated by iptables-nft-save v1.8.9 (nf_tables) on Mon Nov 30 05:57:01 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -j DROP
-A OUTPUT -o lo -j ACCEPT
-A OUTPUT -j ACCEPT
COMMIT
";

    #[test]
    fn save_dumps_tell_weft_chains_and_rule_counts() {
        assert_eq!(
            BackendState::from_saves([LEGACY_SAVE_WITH_WEFT, ""]),
            BackendState {
                weft_chains: true,
                rules: 3
            }
        );
        assert_eq!(
            BackendState::from_saves([NFT_SAVE_FIREWALL, NFT_SAVE_FIREWALL]),
            BackendState {
                weft_chains: false,
                rules: 8
            }
        );
        assert_eq!(BackendState::from_saves([]), BackendState::default());
    }

    #[test]
    fn detection_prefers_weft_chains_then_more_rules_then_the_default() {
        let weft = BackendState::from_saves([LEGACY_SAVE_WITH_WEFT]);
        let busy = BackendState::from_saves([NFT_SAVE_FIREWALL]);
        let empty = BackendState::default();
        // Weft's chains win over more rules elsewhere and over the default.
        let d = choose_backend(weft, busy, Backend::Nft);
        assert_eq!(d.backend, Backend::Legacy);
        assert!(d.reason.contains("Weft's chains"), "{}", d.reason);
        assert_eq!(
            choose_backend(busy, weft, Backend::Legacy).backend,
            Backend::Nft
        );
        // No Weft chains: more rules win over the default.
        let d = choose_backend(empty, busy, Backend::Legacy);
        assert_eq!(d.backend, Backend::Nft);
        assert!(
            d.reason.contains("0 rules in legacy, 4 in nft"),
            "{}",
            d.reason
        );
        assert_eq!(
            choose_backend(busy, empty, Backend::Nft).backend,
            Backend::Legacy
        );
        // Nothing anywhere: the system default.
        for default in [Backend::Legacy, Backend::Nft] {
            let d = choose_backend(empty, empty, default);
            assert_eq!(d.backend, default);
            assert!(d.reason.contains("system default"), "{}", d.reason);
        }
        // Weft's chains in both: decided like no Weft chains, and said so.
        let d = choose_backend(weft, weft, Backend::Nft);
        assert_eq!(d.backend, Backend::Nft);
        assert!(d.reason.contains("both hold"), "{}", d.reason);
    }

    #[test]
    fn system_default_reads_iptables_version() {
        assert_eq!(
            system_default(Some("iptables v1.8.9 (nf_tables)\n")),
            Backend::Nft
        );
        assert_eq!(
            system_default(Some("iptables v1.8.9 (legacy)\n")),
            Backend::Legacy
        );
        assert_eq!(system_default(Some("iptables v1.6.1\n")), Backend::Legacy);
        assert_eq!(system_default(None), Backend::Nft);
    }

    #[test]
    fn removal_finds_jumps_into_weft_chains_and_the_chains() {
        let (jumps, chains) = weft_rules_in(LEGACY_SAVE_WITH_WEFT);
        assert_eq!(
            jumps,
            [
                vec!["PREROUTING", "-p", "tcp", "-j", "WEFT_INBOUND"],
                vec!["OUTPUT", "-p", "tcp", "-j", "WEFT_OUTPUT"],
            ]
        );
        assert_eq!(chains, ["WEFT_INBOUND", "WEFT_OUTPUT"]);
        assert_eq!(
            removal_input(&chains),
            "*nat\n:WEFT_INBOUND - [0:0]\n:WEFT_OUTPUT - [0:0]\n-X WEFT_INBOUND\n-X WEFT_OUTPUT\nCOMMIT\n"
        );
        assert_eq!(weft_rules_in(NFT_SAVE_FIREWALL), (vec![], vec![]));
    }

    #[test]
    fn ip6tables_sibling_keeps_the_directory_and_suffix() {
        assert_eq!(ip6tables_sibling("iptables").as_deref(), Some("ip6tables"));
        assert_eq!(
            ip6tables_sibling("/usr/sbin/iptables-legacy").as_deref(),
            Some("/usr/sbin/ip6tables-legacy")
        );
        assert_eq!(ip6tables_sibling("/opt/bin/my-iptables"), None);
    }
}
