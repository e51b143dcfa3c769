//! `mesh-init trace` against the kernel: what it says about a packet is what happens to it.
//!
//! - The rules installed by each backend (iptables-legacy, iptables-nft, native nftables), read
//!   back with `trace --live`, give every packet of the Istio conformance set the verdict the plan
//!   gives it: the read-back and the install lose nothing.
//! - Real connections (outbound, inbound, the proxy's own, loopback) end where `trace --live`
//!   said they would: on the redirect port it named, or on their own destination.

use std::{fs, process::Command};

use mesh_e2e::{bin, origdst_server, script, PodNet, POD_V4, REMOTE_V4};
use mesh_lab::{check, privileged, TempDir};

const BACKENDS: [&[&str]; 3] =
    [&["--iptables-backend", "legacy"], &["--iptables-backend", "nft"], &["--native-nftables"]];

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(check(cmd).stdout).unwrap()
}

#[test]
fn live_rules_give_the_verdicts_of_the_plan() {
    if !privileged("live_rules_give_the_verdicts_of_the_plan") {
        return;
    }
    let dir = TempDir::new("trace");
    // The conformance packets without the group names only Istio's test machine has.
    let all = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-init/tests/istio/packets.txt")).unwrap();
    let packets: String =
        all.lines().filter(|l| !l.contains("java") && !l.contains("ftp")).map(|l| l.to_string() + "\n").collect();
    let packets = dir.write("packets.txt", &packets);
    let resolv = dir.write("resolv.conf", "nameserver 127.0.0.53\nnameserver ::127.0.0.53\n");
    let resolv = resolv.to_str().unwrap();
    let configs: [&[&str]; 2] = [
        &[
            "-i",
            "10.0.0.0/8,2001:db8::/32",
            "-x",
            "10.96.0.0/30",
            "-b",
            "4000,5000,31000",
            "-o",
            "5555",
            "-q",
            "31000",
            "-u",
            "1337,3",
            "-g",
            "1337,2",
            "-k",
            "eth1",
            "-c",
            "not-istio-nic",
            "--redirect-dns",
            "--resolv-conf",
            resolv,
            "--outbound-owner-groups-exclude",
            "888",
            "--drop-invalid",
        ],
        &[
            "-m",
            "TPROXY",
            "-i",
            "*",
            "-b",
            "*",
            "-d",
            "15020,15021,15090",
            "-u",
            "1000670000",
            "-g",
            "1000670001",
            "--redirect-dns",
            "--capture-all-dns",
            "-c",
            "not-istio-nic",
        ],
    ];
    for config in configs {
        let plan = stdout(Command::new(bin("mesh-init")).arg("trace").args(config).arg("--packets").arg(&packets));
        assert!(plan.lines().count() > 150, "{plan}");
        for backend in BACKENDS {
            let net = PodNet::new("live");
            let ns = net.pod.name();
            check(
                Command::new(bin("mesh-init"))
                    .args(["iptables", "--dual-stack", "--netns", ns])
                    .args(config)
                    .args(backend),
            );
            let live = stdout(
                Command::new(bin("mesh-init")).args(["trace", "--live", "--netns", ns]).arg("--packets").arg(&packets),
            );
            assert!(!live.contains("warning"), "{backend:?}: every installed rule is understood:\n{live}");
            let differ: Vec<String> = plan
                .lines()
                .zip(live.lines())
                .filter(|(p, l)| p != l)
                .map(|(p, l)| format!("plan {p} / installed {l}"))
                .collect();
            assert!(differ.is_empty(), "{config:?} {backend:?}:\n{}", differ.join("\n"));
            assert_eq!(plan.lines().count(), live.lines().count());
        }
    }
}

/// Where a real connection ended, against what `trace --live` said: `redirect=P` means the
/// listener on P accepted it; anything else, the destination itself.
#[test]
fn the_kernel_does_what_trace_says() {
    if !privileged("the_kernel_does_what_trace_says") {
        return;
    }
    for backend in BACKENDS {
        let net = PodNet::new("agree");
        let ns = net.pod.name();
        let flags = ["-p", "15000", "-z", "15006", "-i", "*", "-b", "*", "-o", "81", "-d", "8081"];
        check(Command::new(bin("mesh-init")).args(["iptables", "--netns", ns]).args(flags).args(backend));
        let _proxy = origdst_server(net.pod.command_as(1337, 1337, "python3"), &[15000, 15006]);
        let _app = origdst_server(net.pod.command("python3"), &[8080, 8081]);
        let _remote = origdst_server(net.remote.command("python3"), &[80, 81]);
        let probe = |mut cmd: Command, addr: &str| -> u16 {
            let line = stdout(cmd.arg(script("probe.py")).arg(addr));
            let port =
                line.split_whitespace().find_map(|w| w.strip_prefix("port=")).unwrap_or_else(|| panic!("{line}"));
            port.parse().unwrap()
        };
        // (what, trace's packet flags, the real connection: (uid, from the remote?), address)
        let cases: [(&str, &[&str], u32, bool, String); 7] = [
            ("app to a remote", &["--dst", "10.200.0.2:80"], 0, false, format!("{REMOTE_V4}:80")),
            ("app to an excluded port", &["--dst", "10.200.0.2:81"], 0, false, format!("{REMOTE_V4}:81")),
            (
                "the proxy to a remote",
                &["--dst", "10.200.0.2:80", "--uid", "1337", "--gid", "1337"],
                1337,
                false,
                format!("{REMOTE_V4}:80"),
            ),
            (
                "inbound",
                &["--inbound", "--src", "10.200.0.2", "--dst", "10.200.0.1:8080"],
                0,
                true,
                format!("{POD_V4}:8080"),
            ),
            (
                "inbound to an excluded port",
                &["--inbound", "--src", "10.200.0.2", "--dst", "10.200.0.1:8081"],
                0,
                true,
                format!("{POD_V4}:8081"),
            ),
            (
                "the proxy calling its pod",
                &["--dst", "10.200.0.1:8080", "--out-iface", "lo", "--uid", "1337", "--gid", "1337"],
                1337,
                false,
                format!("{POD_V4}:8080"),
            ),
            ("app on loopback", &["--dst", "127.0.0.1:8081"], 0, false, "127.0.0.1:8081".into()),
        ];
        for (what, packet, uid, from_remote, addr) in cases {
            let answer = stdout(Command::new(bin("mesh-init")).args(["trace", "--live", "--netns", ns]).args(packet));
            let verdict =
                answer.lines().find_map(|l| l.strip_prefix("verdict: ")).unwrap_or_else(|| panic!("{answer}"));
            let said =
                verdict.split_whitespace().find_map(|w| w.strip_prefix("redirect=")).map(|p| p.parse::<u16>().unwrap());
            let own: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
            let cmd = if from_remote { net.remote.command("python3") } else { net.pod.command_as(uid, uid, "python3") };
            let got = probe(cmd, &addr);
            assert_eq!(
                got,
                said.unwrap_or(own),
                "{backend:?}: {what}: trace said {verdict:?}, the kernel delivered to port {got}"
            );
        }
    }
}
