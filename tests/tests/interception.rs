//! The interception behaviour every mode must have, as one suite run against each mode.
//!
//! A pod namespace and a remote namespace are joined by a veth pair. A stand-in proxy
//! (`py/origdst_server.py`, running as UID 1337 like the real sidecar) listens on the redirect
//! ports and answers each connection with the original destination it read; a stand-in remote
//! server answers the same way, so a reply says who answered and where the client was going.
//! Clients are real sockets (`py/probe.py`) in the pod, as root (an application) or as the proxy's
//! UID/GID.

use std::process::{Command, Output};

use mesh_e2e::{bin, ebpf_status_of, origdst_server, script, PodNet, POD_V4, POD_V6, REMOTE_V4, REMOTE_V6};
use mesh_lab::{check, Cgroup, Proc};

const PROXY_UID: u32 = 1337;
const APP_UID: u32 = 0;

/// How interception is installed: `mesh-init iptables` through each of its backends, or eBPF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// iptables-legacy (x_tables).
    Legacy,
    /// iptables-nft (iptables rules in nf_tables).
    IptablesNft,
    /// `--native-nftables`: nftables tables of mesh-init's own.
    Nftables,
    Ebpf,
}

impl Mode {
    fn is_netfilter(self) -> bool {
        self != Mode::Ebpf
    }
}

/// One parsed reply line of `origdst_server.py`.
#[derive(Debug)]
struct Reply {
    /// `SO_ORIGINAL_DST`, or the local address when there is none (a connection steered
    /// without NAT keeps its destination as the local address).
    dest: String,
    /// Which listening port accepted the connection.
    port: u16,
}

fn parse_reply(line: &str) -> Result<Reply, String> {
    if line.starts_with("error") {
        return Err(line.to_string());
    }
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .ok_or_else(|| format!("no {k}= in {line:?}"))
    };
    let orig = field("orig")?;
    let dest = if orig == "none" { field("local")? } else { orig };
    Ok(Reply { dest: dest.to_string(), port: field("port")?.parse().map_err(|e| format!("{e}"))? })
}

struct Harness {
    mode: Mode,
    net: PodNet,
    /// The pod's cgroup (eBPF mode attaches there); every pod process joins it in both modes.
    cgroup: Cgroup,
    procs: Vec<Proc>,
}

impl Harness {
    fn new(mode: Mode, tag: &str) -> Harness {
        let net = PodNet::new(tag);
        let cgroup = Cgroup::new(tag);
        Harness { mode, net, cgroup, procs: Vec::new() }
    }

    fn mesh_init(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("mesh-init"));
        match self.mode {
            Mode::Legacy => cmd.args(["iptables", "--iptables-backend", "legacy"]),
            Mode::IptablesNft => cmd.args(["iptables", "--iptables-backend", "nft"]),
            Mode::Nftables => cmd.args(["iptables", "--native-nftables"]),
            Mode::Ebpf => cmd.arg("ebpf").arg("--cgroup").arg(self.cgroup.path()),
        };
        cmd.args(["--netns", self.net.pod.name()]).args(with_suite_defaults(args));
        cmd.output().expect("run mesh-init")
    }

    /// Installs interception with `args`; panics with mesh-init's output if it fails.
    fn install(&self, args: &[&str]) {
        let out = self.mesh_init(args);
        assert!(
            out.status.success(),
            "mesh-init {:?} {args:?} failed:\n{}{}",
            self.mode,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A command in the pod (namespace and cgroup) as `uid`/`gid`.
    fn pod_cmd(&self, uid: u32, gid: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = self.net.pod.command_as(uid, gid, program);
        self.cgroup.enter(&mut cmd);
        cmd
    }

    /// The stand-in proxy: UID 1337, listening on `ports` in the pod.
    fn proxy(&mut self, ports: &[u16]) {
        let cmd = self.pod_cmd(PROXY_UID, PROXY_UID, "python3");
        self.procs.push(origdst_server(cmd, ports));
    }

    /// An application server in the pod (not the proxy).
    fn pod_app(&mut self, ports: &[u16]) {
        let cmd = self.pod_cmd(APP_UID, APP_UID, "python3");
        self.procs.push(origdst_server(cmd, ports));
    }

    /// A server on the remote host.
    fn remote(&mut self, ports: &[u16]) {
        self.procs.push(origdst_server(self.net.remote.command("python3"), ports));
    }

    fn probe(mut cmd: Command, addr: &str) -> Result<Reply, String> {
        let out = cmd.arg(script("probe.py")).args([addr, "2"]).output().expect("run probe.py");
        parse_reply(String::from_utf8_lossy(&out.stdout).trim())
    }

    /// Connects from the pod as `uid`/`gid` to `addr`.
    fn dial_from_pod(&self, uid: u32, gid: u32, addr: &str) -> Result<Reply, String> {
        Self::probe(self.pod_cmd(uid, gid, "python3"), addr)
    }

    fn dial_from_app(&self, addr: &str) -> Reply {
        self.dial_from_pod(APP_UID, APP_UID, addr).unwrap_or_else(|e| panic!("app -> {addr}: {e}"))
    }

    fn dial_from_remote(&self, addr: &str) -> Reply {
        Self::probe_from_remote(self, addr).unwrap_or_else(|e| panic!("remote -> {addr}: {e}"))
    }

    fn probe_from_remote(&self, addr: &str) -> Result<Reply, String> {
        Self::probe(self.net.remote.command("python3"), addr)
    }

    /// What mesh-init has installed, as text that changes when anything is added or removed.
    fn footprint(&self) -> String {
        let saved = |flavour: &str| {
            // Rules and user chains per table; an empty table that nf_tables keeps after its
            // last rule is gone is not state anyone can observe.
            let mut s = String::new();
            for save in [format!("iptables-{flavour}-save"), format!("ip6tables-{flavour}-save")] {
                let out = check(&mut self.net.pod.command(&save));
                let mut table = String::new();
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    if let Some(t) = line.strip_prefix('*') {
                        table = t.to_string();
                    } else if line.starts_with("-A")
                        || (line.starts_with(':') && line.split_whitespace().nth(1) == Some("-"))
                    {
                        s += &format!("{save} {table} {line}\n");
                    }
                }
            }
            s
        };
        match self.mode {
            Mode::Legacy => saved("legacy"),
            Mode::IptablesNft => saved("nft"),
            Mode::Nftables => self.net.pod.sh("nft list ruleset"),
            // This pod's block of `mesh-init status`, without the traffic counters.
            Mode::Ebpf => ebpf_status_of(&self.net.pod, &self.cgroup, &["counters:"]),
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Detach before the cgroup and namespaces go away, also when the test failed.
        self.procs.clear();
        if self.mode == Mode::Ebpf {
            let _ = self.mesh_init(&["--cleanup-only"]);
        }
    }
}

/// The suite's defaults, the same for every mode: one proxy port (15000) for both directions,
/// everything captured. `mesh-init iptables` alone would follow istio-iptables (`-p 15001 -z
/// 15006`, nothing captured); `args` override these.
fn with_suite_defaults<'a>(args: &[&'a str]) -> Vec<&'a str> {
    if args.contains(&"--cleanup-only") {
        return args.to_vec();
    }
    let given = |short: &str, long: &str| args.iter().any(|a| *a == short || *a == long);
    let mut out = args.to_vec();
    if !given("-p", "--envoy-port") {
        out.extend(["-p", "15000"]);
    }
    if !given("-z", "--inbound-capture-port") {
        let p = args.iter().position(|a| *a == "-p").map_or("15000", |i| args[i + 1]);
        out.extend(["-z", p]);
    }
    if !given("-i", "--istio-service-cidr") {
        out.extend(["-i", "*"]);
    }
    if !given("-b", "--istio-inbound-ports") {
        out.extend(["-b", "*"]);
    }
    out
}

fn v6(addr: &str, port: u16) -> String {
    format!("[{addr}]:{port}")
}

fn outbound_is_redirected_with_its_original_destination(mode: Mode) {
    let mut h = Harness::new(mode, "out4");
    h.install(&[]);
    h.proxy(&[15000]);
    let r = h.dial_from_app(&format!("{REMOTE_V4}:80"));
    assert_eq!((r.port, r.dest.as_str()), (15000, "10.200.0.2:80"));
    let r = h.dial_from_app(&format!("{REMOTE_V4}:8443"));
    assert_eq!((r.port, r.dest.as_str()), (15000, "10.200.0.2:8443"));
}

fn outbound_ipv6_is_redirected_with_its_original_destination(mode: Mode) {
    let mut h = Harness::new(mode, "out6");
    h.install(&["--dual-stack"].filter_for(mode));
    h.proxy(&[15000]);
    let r = h.dial_from_app(&v6(REMOTE_V6, 80));
    assert_eq!((r.port, r.dest.as_str()), (15000, "[fd00:200::2]:80"));
    let lo = h.net.pod.sh("ip -6 addr show dev lo");
    assert!(lo.contains("::6/128"), "the proxy's IPv6 passthrough source is on lo: {lo}");
}

fn proxy_uid_and_gid_are_not_redirected(mode: Mode) {
    let mut h = Harness::new(mode, "owner");
    h.install(&["-u", "1337", "-g", "1338"]);
    h.proxy(&[15000]);
    h.remote(&[80]);
    let by_uid = h.dial_from_pod(1337, 1337, &format!("{REMOTE_V4}:80")).unwrap();
    assert_eq!(by_uid.port, 80, "the proxy's UID reaches the real destination");
    let by_gid = h.dial_from_pod(1000, 1338, &format!("{REMOTE_V4}:80")).unwrap();
    assert_eq!(by_gid.port, 80, "the proxy's GID reaches the real destination");
    let other = h.dial_from_pod(1000, 1000, &format!("{REMOTE_V4}:80")).unwrap();
    assert_eq!(other.port, 15000, "anyone else is redirected");
}

fn loopback_is_not_redirected(mode: Mode) {
    let mut h = Harness::new(mode, "lo");
    h.install(&[]);
    h.proxy(&[15000]);
    h.pod_app(&[8081]);
    let r = h.dial_from_app("127.0.0.1:8081");
    assert_eq!(r.port, 8081);
    let r = h.dial_from_app("[::1]:8081");
    assert_eq!(r.port, 8081);
}

fn excluded_cidrs_and_ports_bypass(mode: Mode) {
    let mut h = Harness::new(mode, "excl");
    h.net.add_remote_addr("10.200.7.1/24");
    h.net.pod.ip(&["route", "add", "10.200.7.0/24", "via", REMOTE_V4]);
    h.install(&["-x", "10.200.7.0/24", "-o", "81,90-99"]);
    h.proxy(&[15000]);
    h.remote(&[80, 81, 95]);
    assert_eq!(h.dial_from_app("10.200.7.1:80").port, 80, "excluded CIDR goes direct");
    assert_eq!(h.dial_from_app(&format!("{REMOTE_V4}:81")).port, 81, "excluded port goes direct");
    assert_eq!(h.dial_from_app(&format!("{REMOTE_V4}:95")).port, 95, "port in an excluded range goes direct");
    let r = h.dial_from_app(&format!("{REMOTE_V4}:80"));
    assert_eq!((r.port, r.dest.as_str()), (15000, "10.200.0.2:80"), "the rest is captured");
}

fn only_included_cidrs_are_captured(mode: Mode) {
    let mut h = Harness::new(mode, "incl");
    h.net.add_remote_addr("10.200.9.1/24");
    h.net.pod.ip(&["route", "add", "10.200.9.0/24", "via", REMOTE_V4]);
    h.install(&["-i", "10.200.9.0/24"]);
    h.proxy(&[15000]);
    h.remote(&[80]);
    let r = h.dial_from_app("10.200.9.1:80");
    assert_eq!((r.port, r.dest.as_str()), (15000, "10.200.9.1:80"));
    assert_eq!(h.dial_from_app(&format!("{REMOTE_V4}:80")).port, 80, "outside the included CIDRs goes direct");
}

fn inbound_is_steered_to_the_inbound_port_except_excluded_ports(mode: Mode) {
    let mut h = Harness::new(mode, "in");
    h.install(&["-p", "15001", "-z", "15006", "-d", "8081"]);
    h.proxy(&[15001, 15006]);
    h.pod_app(&[8080, 8081]);
    let r = h.dial_from_remote(&format!("{POD_V4}:8080"));
    assert_eq!((r.port, r.dest.as_str()), (15006, "10.200.0.1:8080"), "inbound goes to the inbound port");
    assert_eq!(h.dial_from_remote(&format!("{POD_V4}:8081")).port, 8081, "excluded inbound port reaches the app");
    let r = h.dial_from_app(&format!("{REMOTE_V4}:80"));
    assert_eq!(r.port, 15001, "outbound still goes to the outbound port");
}

/// istio-iptables returns inbound connections to the tunnel port (`-e`, 15008: HBONE) before
/// any redirection: the proxy listens there itself and must see the real destination.
fn inbound_tunnel_port_is_not_steered(mode: Mode) {
    let mut h = Harness::new(mode, "tunnel");
    h.install(&["-e", "15010", "--dual-stack"].filter_for(mode));
    h.proxy(&[15000, 15010]);
    h.pod_app(&[15008]);
    assert_eq!(h.dial_from_remote(&format!("{POD_V4}:15010")).port, 15010, "the tunnel port is not steered");
    let r = h.dial_from_remote(&format!("{POD_V4}:15008"));
    assert_eq!(r.port, 15000, "15008 is an ordinary port when -e names another");
    let r = h.dial_from_remote(&v6(POD_V6, 15010));
    assert_eq!(r.port, 15010, "nor over IPv6");
}

fn rerun_is_idempotent_and_other_flags_replace(mode: Mode) {
    let mut h = Harness::new(mode, "rerun");
    h.install(&["-o", "81"]);
    let first = h.footprint();
    h.install(&["-o", "81"]);
    assert_eq!(h.footprint(), first, "the same command twice leaves the same state");
    h.install(&["-o", "82"]);
    assert_ne!(h.footprint(), first, "other flags replace the rules");
    h.proxy(&[15000]);
    h.remote(&[81, 82]);
    assert_eq!(h.dial_from_app(&format!("{REMOTE_V4}:81")).port, 15000, "81 is no longer excluded");
    assert_eq!(h.dial_from_app(&format!("{REMOTE_V4}:82")).port, 82, "82 now is");
}

fn bad_input_changes_nothing(mode: Mode) {
    let mut h = Harness::new(mode, "bad");
    h.install(&[]);
    let before = h.footprint();
    for (args, flag) in [
        (&["-x", "10.0.0.0/33"][..], "--istio-service-exclude-cidr"),
        (&["-p", "70000"][..], "--envoy-port"),
        (&["-u", "no-such-user"][..], "--proxy-uid"),
        (&["-d", "8080,x"][..], "--istio-local-exclude-ports"),
    ] {
        let out = h.mesh_init(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(err.contains(flag), "{args:?}: the error names {flag}: {err}");
        assert_eq!(h.footprint(), before, "{args:?} changed the installed state");
    }
    h.proxy(&[15000]);
    assert_eq!(h.dial_from_app(&format!("{REMOTE_V4}:80")).port, 15000, "interception still works");
}

fn validate_proves_interception(mode: Mode) {
    let h = Harness::new(mode, "val");
    let validate = |expect_ok: bool| {
        let mut cmd = h.pod_cmd(APP_UID, APP_UID, bin("mesh-init"));
        cmd.args(["validate", "-p", "15000", "--probe-address", &format!("{REMOTE_V4}:15099"), "--timeout", "1s"]);
        let out = cmd.output().expect("run validate");
        assert_eq!(out.status.success(), expect_ok, "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(if expect_ok { &out.stdout } else { &out.stderr }).into_owned()
    };
    let err = validate(false);
    assert!(err.contains("not redirected") || err.contains("failed"), "{err}");
    h.install(&[]);
    let ok = validate(true);
    assert!(ok.contains("original destination 10.200.0.2:15099"), "{ok}");
}

fn cleanup_removes_everything_it_installed(mode: Mode) {
    let mut h = Harness::new(mode, "clean");
    let foreign = |ipt: &str| {
        format!(
            "{ipt} -t nat -N FOREIGN && {ipt} -t nat -A OUTPUT -p tcp --dport 9 -j FOREIGN \
             && {ipt} -t nat -A PREROUTING -p tcp -j FOREIGN"
        )
    };
    match mode {
        Mode::Legacy => drop(h.net.pod.sh(&foreign("iptables-legacy"))),
        Mode::IptablesNft => drop(h.net.pod.sh(&foreign("iptables-nft"))),
        Mode::Nftables => drop(
            h.net
                .pod
                .sh("nft add table ip foreign && nft add chain ip foreign out '{ type nat hook output priority 0; }' \
             && nft add rule ip foreign out tcp dport 9 accept"),
        ),
        Mode::Ebpf => {}
    }
    let before = h.footprint();
    h.install(&["--redirect-dns", "--capture-all-dns"].filter_for(mode));
    assert_ne!(h.footprint(), before);
    h.install(&["--cleanup-only"]);
    assert_eq!(h.footprint(), before, "cleanup restores the state before mesh-init, foreign rules included");
    assert!(!h.net.pod.sh("ip -6 addr show dev lo").contains("::6/128"), "::6 is removed from lo");
    h.remote(&[80]);
    assert_eq!(h.dial_from_app(&format!("{REMOTE_V4}:80")).port, 80, "nothing is redirected any more");
    let again = h.mesh_init(&["--cleanup-only"]);
    assert!(again.status.success(), "cleanup of nothing succeeds");
}

fn inbound_and_outbound_are_refused_while_the_proxy_is_down(mode: Mode) {
    let mut h = Harness::new(mode, "down");
    h.install(&[]);
    h.pod_app(&[8080]);
    h.remote(&[80]);
    let (to_app, to_remote) = (format!("{POD_V4}:8080"), format!("{REMOTE_V4}:80"));
    h.proxy(&[15000]);
    assert_eq!(h.dial_from_remote(&to_app).port, 15000, "inbound goes to the proxy");
    // SIGKILL, as a crash or an OOM kill would: the proxy's sockets close with it.
    h.procs.pop().expect("the proxy is the last process started");
    let inbound = h.probe_from_remote(&to_app);
    assert!(inbound.is_err(), "inbound is refused, not handed to the application: {inbound:?}");
    let outbound = h.dial_from_pod(APP_UID, APP_UID, &to_remote);
    assert!(outbound.is_err(), "outbound is refused, not sent to the destination: {outbound:?}");
}

fn the_application_sees_the_dialled_destination_as_its_peer(mode: Mode) {
    let mut h = Harness::new(mode, "peer");
    h.install(&["--dual-stack"].filter_for(mode));
    h.proxy(&[15000]);
    for (family, addr) in [("AF_INET", REMOTE_V4), ("AF_INET6", REMOTE_V6)] {
        let code = format!(
            "import socket\n\
             s = socket.create_connection(('{addr}', 80), timeout=2)\n\
             print(s.getpeername()[0], s.getpeername()[1])\n"
        );
        let out = check(h.pod_cmd(APP_UID, APP_UID, "python3").args(["-c", &code]));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{addr} 80"), "{family}");
    }
}

/// iptables' owner match tests the socket's owner (the credentials that created it), not the
/// thread that calls connect(); the three ways they differ.
fn the_proxy_exemption_follows_the_socket_owner(mode: Mode) {
    let mut h = Harness::new(mode, "sockown");
    h.install(&[]);
    h.proxy(&[15000]);
    h.remote(&[80]);
    let code = format!(
        r#"
import ctypes, os, socket, sys, threading
DEST = ('{REMOTE_V4}', 80)
def answer(s):
    s.settimeout(2)
    s.connect(DEST)
    line = s.makefile().readline()
    return [f for f in line.split() if f.startswith('port=')][0]
case = sys.argv[1]
if case == 'created-by-app-connected-by-proxy':
    s = socket.socket()
    os.setresgid(1337, 1337, 1337); os.setresuid(1337, 1337, 1337)
    print(answer(s))
elif case == 'created-by-proxy-connected-by-app':
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    if os.fork() == 0:
        os.setresgid(1337, 1337, 1337); os.setresuid(1337, 1337, 1337)
        made = socket.socket()
        socket.send_fds(b, [b'fd'], [made.fileno()])
        os._exit(0)
    b.close()
    _, fds, _, _ = socket.recv_fds(a, 16, 1)
    print(answer(socket.socket(fileno=fds[0])))
elif case == 'created-by-proxy-thread-connected-by-app-thread':
    libc = ctypes.CDLL(None, use_errno=True)
    made = []
    def make():
        # Raw system calls (x86-64 numbers) change this thread's credentials only; glibc's
        # wrappers would change every thread's.
        assert os.uname().machine == 'x86_64'
        assert libc.syscall(119, 1337, 1337, 1337) == 0  # setresgid
        assert libc.syscall(117, 1337, 1337, 1337) == 0  # setresuid
        made.append(socket.socket())
    t = threading.Thread(target=make); t.start(); t.join()
    print(answer(made[0]))
"#
    );
    for (case, want) in [
        ("created-by-app-connected-by-proxy", "port=15000"),
        ("created-by-proxy-connected-by-app", "port=80"),
        ("created-by-proxy-thread-connected-by-app-thread", "port=80"),
    ] {
        let out = check(h.pod_cmd(APP_UID, APP_UID, "python3").args(["-c", &code, case]));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want, "{case}");
    }
}

/// Flags that only one mode has.
trait ForMode {
    fn filter_for(self, mode: Mode) -> Vec<&'static str>;
}

impl<const N: usize> ForMode for [&'static str; N] {
    fn filter_for(self, mode: Mode) -> Vec<&'static str> {
        if mode.is_netfilter() {
            return self.to_vec();
        }
        // Dual stack is always on in the eBPF mode; DNS capture is netfilter-only.
        self.into_iter().filter(|f| !matches!(*f, "--dual-stack" | "--redirect-dns" | "--capture-all-dns")).collect()
    }
}

macro_rules! suite {
    ($mode:ident, $($test:ident),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                if !mesh_lab::privileged(stringify!($test)) {
                    return;
                }
                super::$test(super::Mode::$mode);
            }
        )*
    };
}

macro_rules! all_modes {
    ($($mode:ident => $module:ident),*) => {
        $(
            mod $module {
                suite!(
                    $mode,
                    outbound_is_redirected_with_its_original_destination,
                    outbound_ipv6_is_redirected_with_its_original_destination,
                    proxy_uid_and_gid_are_not_redirected,
                    loopback_is_not_redirected,
                    excluded_cidrs_and_ports_bypass,
                    only_included_cidrs_are_captured,
                    inbound_is_steered_to_the_inbound_port_except_excluded_ports,
                    inbound_tunnel_port_is_not_steered,
                    rerun_is_idempotent_and_other_flags_replace,
                    bad_input_changes_nothing,
                    validate_proves_interception,
                    cleanup_removes_everything_it_installed,
                    inbound_and_outbound_are_refused_while_the_proxy_is_down,
                    the_application_sees_the_dialled_destination_as_its_peer,
                    the_proxy_exemption_follows_the_socket_owner,
                );
            }
        )*
    };
}

all_modes!(Legacy => iptables_legacy, IptablesNft => iptables_nft, Nftables => nftables, Ebpf => ebpf);
