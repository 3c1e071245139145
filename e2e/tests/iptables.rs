//! `weft init-iptables` in real network namespaces, without Envoy: which back end it
//! writes to, that reruns and removals are idempotent in both families, and where real
//! TCP connections land (a pod calling itself, the proxy's own traffic, the inbound
//! passthrough source, loopback, other destinations), over IPv4 and IPv6.
//!
//! Needs root. Namespaces are named `wfti-*` and removed on drop, also after a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const PROXY_UID: &str = "1337";
/// Any UID but the proxy's: the app.
const APP_UID: &str = "1000";
const APP_PORT: u16 = 8080;
const OUTBOUND_PORT: u16 = 15001;
const INBOUND_PORT: u16 = 15006;

/// The pod's own addresses and a ClusterIP of each family (on-link, never answered).
const POD_V4: &str = "198.18.250.2";
const CLUSTER_IP_V4: &str = "198.19.250.10";
const POD_V6: &str = "fd00:77::2";
const CLUSTER_IP_V6: &str = "fd00:78::10";

/// Every Weft rule `*-save -t nat` shows after an install with [`INSTALL_ARGS`], in order.
const RULES_V4: &[&str] = &[
    "-A PREROUTING -p tcp -j WEFT_INBOUND",
    "-A OUTPUT -p tcp -j WEFT_OUTPUT",
    "-A WEFT_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
    "-A WEFT_INBOUND -p tcp -j WEFT_IN_REDIRECT",
    "-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    "-A WEFT_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
    "-A WEFT_OUTPUT ! -d 127.0.0.0/8 -o lo -p tcp -m owner --uid-owner 1337 -j WEFT_IN_REDIRECT",
    "-A WEFT_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
    "-A WEFT_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    "-A WEFT_OUTPUT -d 127.0.0.0/8 -j RETURN",
    "-A WEFT_OUTPUT -d 198.18.0.1/32 -j RETURN",
    "-A WEFT_OUTPUT -p tcp -j WEFT_REDIRECT",
    "-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
];
const RULES_V6: &[&str] = &[
    "-A PREROUTING -p tcp -j WEFT_INBOUND",
    "-A OUTPUT -p tcp -j WEFT_OUTPUT",
    "-A WEFT_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
    "-A WEFT_INBOUND -p tcp -j WEFT_IN_REDIRECT",
    "-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    "-A WEFT_OUTPUT -s ::6/128 -o lo -j RETURN",
    "-A WEFT_OUTPUT ! -d ::1/128 -o lo -p tcp -m owner --uid-owner 1337 -j WEFT_IN_REDIRECT",
    "-A WEFT_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
    "-A WEFT_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    "-A WEFT_OUTPUT -d ::1/128 -j RETURN",
    "-A WEFT_OUTPUT -d fd00:10::/64 -j RETURN",
    "-A WEFT_OUTPUT -p tcp -j WEFT_REDIRECT",
    "-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
];
const INSTALL_ARGS: &[&str] = &[
    "--exclude-inbound-ports",
    "22",
    "--exclude-outbound-cidrs",
    "198.18.0.1/32,fd00:10::/64",
];

/// The `weft` binary: `WEFT_BIN_WEFT`, else next to this test (as e2e/src/lib.rs finds it).
fn weft() -> PathBuf {
    if let Ok(p) = std::env::var("WEFT_BIN_WEFT") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/<bin> or target/debug/deps/<test>.
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("weft"))
        .find(|candidate| candidate.is_file())
        .expect("weft is not built; run `cargo build -p weft --bin weft` first")
}

/// A Python 3 the proxy and app UIDs can run (pyenv shims under /root are not).
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A network namespace, removed (with everything running in it) on drop.
struct Netns {
    name: String,
    children: Vec<Child>,
}

impl Netns {
    fn new(name: &str) -> Self {
        let uid = text(&run("id", &["-u"]).stdout);
        assert_eq!(
            uid.trim(),
            "0",
            "these tests need root (network namespaces)"
        );
        let name = format!("wfti-{name}");
        // A namespace left by a killed run.
        let _ = run("ip", &["netns", "del", &name]);
        let add = run("ip", &["netns", "add", &name]);
        assert!(add.status.success(), "ip netns add: {}", text(&add.stderr));
        let ns = Self {
            name,
            children: Vec::new(),
        };
        ns.ok("ip", &["link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `program` in the namespace and requires success; returns stdout.
    fn ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.exec(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} in {}: {}{}",
            self.name,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Runs `weft init-iptables ARGS` and requires success; returns its log (stderr).
    fn init_iptables(&self, args: &[&str]) -> String {
        let weft = weft();
        let mut all = vec!["init-iptables"];
        all.extend_from_slice(args);
        let out = self.exec(&weft.to_string_lossy(), &all);
        assert!(
            out.status.success(),
            "weft init-iptables {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stderr)
    }

    /// The `-A` lines of a `-save` dump (`prog` like `iptables-legacy`), nat table only or all.
    fn rules(&self, prog: &str, nat_only: bool) -> Vec<String> {
        let save = format!("{prog}-save");
        let args: &[&str] = if nat_only { &["-t", "nat"] } else { &[] };
        self.ok(&save, args)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(str::to_string)
            .collect()
    }

    fn weft_rules(&self, prog: &str) -> Vec<String> {
        self.rules(prog, false)
            .into_iter()
            .filter(|l| l.contains("WEFT_"))
            .collect()
    }

    fn lo_has_passthrough_v6(&self) -> bool {
        !self
            .ok(
                "ip",
                &["-6", "-o", "addr", "show", "dev", "lo", "to", "::6/128"],
            )
            .trim()
            .is_empty()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let pids = run("ip", &["netns", "pids", &self.name]);
        for pid in text(&pids.stdout).split_whitespace() {
            let _ = run("kill", &["-KILL", pid]);
        }
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

fn lines(rules: &[&str]) -> Vec<String> {
    rules.iter().map(|r| r.to_string()).collect()
}

fn other(backend: &str) -> &'static str {
    if backend == "legacy" { "nft" } else { "legacy" }
}

/// Installs twice and removes twice with `--iptables-backend BACKEND`.
fn install_and_remove_with(backend: &str) {
    let ns = Netns::new(&format!("once-{backend}"));
    let flag = ["--iptables-backend", backend];
    for _ in 0..2 {
        ns.init_iptables(&[&flag[..], INSTALL_ARGS].concat());
    }
    let (v4, v6) = (
        format!("iptables-{backend}"),
        format!("ip6tables-{backend}"),
    );
    assert_eq!(
        ns.rules(&v4, true),
        lines(RULES_V4),
        "one copy of every IPv4 rule"
    );
    assert_eq!(
        ns.rules(&v6, true),
        lines(RULES_V6),
        "one copy of every IPv6 rule"
    );
    for family in ["iptables", "ip6tables"] {
        let untouched = format!("{family}-{}", other(backend));
        assert_eq!(
            ns.rules(&untouched, false),
            Vec::<String>::new(),
            "{untouched} stays empty"
        );
    }
    assert!(ns.lo_has_passthrough_v6(), "::6 is on lo");

    for _ in 0..2 {
        ns.init_iptables(&[&flag[..], &["--remove"]].concat());
    }
    assert_eq!(ns.weft_rules(&v4), Vec::<String>::new());
    assert_eq!(ns.weft_rules(&v6), Vec::<String>::new());
    assert!(!ns.lo_has_passthrough_v6(), "::6 is gone from lo");
    let chains = ns.ok(&format!("{v4}-save"), &["-t", "nat"]);
    assert!(!chains.contains("WEFT_"), "no Weft chain left: {chains}");
}

#[test]
fn legacy_backend_installs_once_and_removes_everything() {
    install_and_remove_with("legacy");
}

#[test]
fn nft_backend_installs_once_and_removes_everything() {
    install_and_remove_with("nft");
}

#[test]
fn auto_follows_the_backend_that_already_has_rules() {
    let ns = Netns::new("auto-legacy");
    // Someone else's rules, in legacy only.
    ns.ok(
        "iptables-legacy",
        &[
            "-w", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT",
        ],
    );
    let log = ns.init_iptables(INSTALL_ARGS);
    assert!(log.contains("iptables back end: iptables-legacy"), "{log}");
    assert!(log.contains("more rules"), "{log}");
    assert_eq!(ns.rules("iptables-legacy", true), lines(RULES_V4));
    assert_eq!(ns.rules("ip6tables-legacy", true), lines(RULES_V6));
    assert_eq!(ns.weft_rules("iptables-nft"), Vec::<String>::new());
    assert_eq!(ns.weft_rules("ip6tables-nft"), Vec::<String>::new());
    // Plain --remove finds them.
    ns.init_iptables(&["--remove"]);
    assert_eq!(ns.weft_rules("iptables-legacy"), Vec::<String>::new());
    assert_eq!(ns.weft_rules("ip6tables-legacy"), Vec::<String>::new());
}

#[test]
fn auto_sticks_to_the_backend_holding_weft_chains() {
    let ns = Netns::new("auto-sticky");
    ns.init_iptables(&[&["--iptables-backend", "nft"][..], INSTALL_ARGS].concat());
    // More rules in legacy now, but Weft's chains are in nft: a rerun updates those.
    for port in [
        "9", "10", "11", "12", "13", "14", "15", "16", "17", "18", "19", "20", "21", "23", "24",
    ] {
        ns.ok(
            "iptables-legacy",
            &[
                "-w", "-A", "INPUT", "-p", "tcp", "--dport", port, "-j", "ACCEPT",
            ],
        );
    }
    let log = ns.init_iptables(INSTALL_ARGS);
    assert!(
        log.contains("iptables back end: iptables-nft, because it holds Weft's chains"),
        "{log}"
    );
    assert_eq!(ns.rules("iptables-nft", true), lines(RULES_V4));
    assert_eq!(ns.weft_rules("iptables-legacy"), Vec::<String>::new());
    ns.init_iptables(&["--remove"]);
    assert_eq!(ns.weft_rules("iptables-nft"), Vec::<String>::new());
}

#[test]
fn auto_uses_the_system_default_in_an_empty_namespace() {
    let version = text(&run("iptables", &["--version"]).stdout);
    let default = if version.contains("nf_tables") {
        "nft"
    } else {
        "legacy"
    };
    let ns = Netns::new("auto-default");
    let log = ns.init_iptables(INSTALL_ARGS);
    assert!(
        log.contains(&format!("iptables back end: iptables-{default}")),
        "{log}"
    );
    assert!(log.contains("system default"), "{log}");
    assert_eq!(
        ns.rules(&format!("iptables-{default}"), true),
        lines(RULES_V4)
    );
    assert_eq!(
        ns.rules(&format!("ip6tables-{default}"), true),
        lines(RULES_V6)
    );
    let untouched = format!("iptables-{}", other(default));
    assert_eq!(ns.weft_rules(&untouched), Vec::<String>::new());
}

#[test]
fn ipv6_is_skipped_when_disabled() {
    let ns = Netns::new("no-v6");
    ns.ok("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    ns.ok("sysctl", &["-qw", "net.ipv6.conf.lo.disable_ipv6=1"]);
    let log = ns.init_iptables(&["--iptables-backend", "nft"]);
    assert!(log.contains("IPv6 redirect skipped"), "{log}");
    assert!(!ns.rules("iptables-nft", true).is_empty());
    assert_eq!(ns.weft_rules("ip6tables-nft"), Vec::<String>::new());
    ns.init_iptables(&["--iptables-backend", "nft", "--remove"]);
    assert_eq!(ns.weft_rules("iptables-nft"), Vec::<String>::new());
}

/// Listens on the app port and both capture ports, IPv4 and IPv6; answers each
/// connection with `<listening port> <original destination>` (SO_ORIGINAL_DST).
const LISTENERS: &str = r#"
import selectors, socket, struct, sys
SO_ORIGINAL_DST = 80
def original_dst(conn, family):
    try:
        if family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, = struct.unpack("!H", raw[2:4])
            return "%s:%d" % (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port, = struct.unpack("!H", raw[2:4])
        return "[%s]:%d" % (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port)
    except OSError:
        return "-"
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(16)
        sel.register(s, selectors.EVENT_READ, (port, family))
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept()
        port, family = key.data
        conn.sendall(("%d %s\n" % (port, original_dst(conn, family))).encode())
        conn.close()
"#;

/// Connects to `argv[1]` port `argv[2]`, from `argv[3]` if given; prints the answer.
const CLIENT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(2)
try:
    if len(sys.argv) > 3:
        s.bind((sys.argv[3], 0))
    s.connect((host, port))
    print(s.makefile().readline().strip())
except OSError as e:
    print("error: %s" % e)
"#;

/// A namespace like a pod: addresses on a device, an on-link ClusterIP range, the
/// redirect installed, and listeners on the app port and both capture ports.
fn pod_with_listeners() -> Netns {
    let mut ns = Netns::new("traffic");
    // A veth pair with both ends inside (this kernel may lack dummy devices): what
    // leaves eth0 arrives on its peer, is not for the namespace, and is dropped.
    ns.ok(
        "ip",
        &[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0-peer",
        ],
    );
    ns.ok("ip", &["link", "set", "eth0-peer", "up"]);
    ns.ok(
        "ip",
        &["addr", "add", &format!("{POD_V4}/24"), "dev", "eth0"],
    );
    ns.ok(
        "ip",
        &[
            "addr",
            "add",
            &format!("{POD_V6}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    ns.ok("ip", &["link", "set", "eth0", "up"]);
    // On-link, as in the harness: routable (so nat OUTPUT sees it), never answered.
    ns.ok("ip", &["route", "add", "198.19.250.0/24", "dev", "eth0"]);
    ns.ok("ip", &["-6", "route", "add", "fd00:78::/64", "dev", "eth0"]);
    ns.init_iptables(&[]);
    let ports = [APP_PORT, OUTBOUND_PORT, INBOUND_PORT].map(|p| p.to_string());
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, python(), "-c", LISTENERS])
        .args(&ports)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the listeners");
    let stdout = child.stdout.take().expect("listener stdout");
    ns.children.push(child);
    let mut ready = String::new();
    let _ = BufReader::new(stdout).read_line(&mut ready);
    assert_eq!(ready.trim(), "ready", "the listeners did not start");
    ns
}

/// Connects as `uid` from inside the namespace; returns the answering listener's line.
fn connect(ns: &Netns, uid: &str, host: &str, port: u16, source: Option<&str>) -> String {
    let port = port.to_string();
    let mut args = vec![
        "--reuid",
        uid,
        "--regid",
        uid,
        "--clear-groups",
        python(),
        "-c",
        CLIENT,
        host,
        &port,
    ];
    args.extend(source);
    ns.ok("setpriv", &args).trim().to_string()
}

#[test]
fn connections_land_where_istios_scheme_puts_them() {
    let ns = pod_with_listeners();
    for (pod, cluster_ip, loopback, passthrough, show) in [
        (
            POD_V4,
            CLUSTER_IP_V4,
            "127.0.0.1",
            "127.0.0.6",
            POD_V4.to_string(),
        ),
        (POD_V6, CLUSTER_IP_V6, "::1", "::6", format!("[{POD_V6}]")),
    ] {
        let cluster = if cluster_ip.contains(':') {
            format!("[{cluster_ip}]")
        } else {
            cluster_ip.to_string()
        };
        // The app calling its own pod stays in the pod: straight to the app.
        assert_eq!(
            connect(&ns, APP_UID, pod, APP_PORT, None),
            format!("{APP_PORT} {show}:{APP_PORT}"),
            "app -> own pod IP"
        );
        // The proxy's outbound leg to its own pod goes through the inbound listener.
        assert_eq!(
            connect(&ns, PROXY_UID, pod, APP_PORT, None),
            format!("{INBOUND_PORT} {show}:{APP_PORT}"),
            "proxy -> own pod IP"
        );
        // Envoy's inbound passthrough (bound to the passthrough source) reaches the app.
        assert_eq!(
            connect(&ns, PROXY_UID, pod, APP_PORT, Some(passthrough)),
            format!("{APP_PORT} {show}:{APP_PORT}"),
            "proxy from {passthrough} -> own pod IP"
        );
        // The app calling anything else goes to the outbound listener.
        assert_eq!(
            connect(&ns, APP_UID, cluster_ip, APP_PORT, None),
            format!("{OUTBOUND_PORT} {cluster}:{APP_PORT}"),
            "app -> ClusterIP"
        );
        // Loopback is left alone, for the app and the proxy.
        for uid in [APP_UID, PROXY_UID] {
            let answer = connect(&ns, uid, loopback, APP_PORT, None);
            assert!(
                answer.starts_with(&format!("{APP_PORT} ")),
                "uid {uid} -> {loopback}: {answer}"
            );
        }
        // The proxy's own outbound connections are not captured (the on-link ClusterIP
        // never answers, so it times out instead of reaching a listener).
        let answer = connect(&ns, PROXY_UID, cluster_ip, APP_PORT, None);
        assert!(answer.starts_with("error"), "proxy -> ClusterIP: {answer}");
    }
}
