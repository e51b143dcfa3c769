//! Every istio-iptables flag and environment variable, through the real binary: the environment
//! variable gives the same rules as its flag (both printed with `--dry-run`, which needs no root),
//! and the defaults are istio-iptables'.

use std::process::Command;

fn dry_run(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh-init"));
    cmd.args(["iptables", "--dry-run", "--dual-stack"]).args(args);
    // Only what the case sets: an inherited variable would change the rules.
    cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run mesh-init");
    assert!(out.status.success(), "{args:?} {env:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn each_environment_variable_equals_its_flag() {
    let resolv = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/resolv.conf");
    // (flags both sides share, the flag itself, its environment variable and value)
    let cases: &[(&[&str], &[&str], &str, &str)] = &[
        (&[], &["-p", "15101"], "ENVOY_PORT", "15101"),
        (&[], &["-z", "15106"], "INBOUND_CAPTURE_PORT", "15106"),
        (&[], &["-e", "15108"], "INBOUND_TUNNEL_PORT", "15108"),
        (&[], &["-u", "1400"], "PROXY_UID", "1400"),
        (&[], &["-g", "1401"], "PROXY_GID", "1401"),
        (&[], &["-i", "10.0.0.0/8"], "ISTIO_SERVICE_CIDR", "10.0.0.0/8"),
        (&["-i", "*"], &["-x", "10.1.0.0/16"], "ISTIO_SERVICE_EXCLUDE_CIDR", "10.1.0.0/16"),
        (&[], &["-q", "3306"], "ISTIO_OUTBOUND_PORTS", "3306"),
        (&[], &["-o", "25"], "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", "25"),
        (&[], &["-b", "*"], "ISTIO_INBOUND_PORTS", "*"),
        (&["-b", "*"], &["-d", "22"], "ISTIO_LOCAL_EXCLUDE_PORTS", "22"),
        (&[], &["-c", "eth9"], "ISTIO_EXCLUDE_INTERFACES", "eth9"),
        (&["-i", "*"], &["-k", "eth8"], "KUBE_VIRT_INTERFACES", "eth8"),
        (&["-b", "*"], &["-m", "TPROXY"], "ISTIO_INBOUND_INTERCEPTION_MODE", "TPROXY"),
        (&["-b", "*", "-m", "TPROXY"], &["-t", "1500"], "ISTIO_INBOUND_TPROXY_MARK", "1500"),
        (&["-b", "*", "-m", "TPROXY"], &["-r", "150"], "ISTIO_INBOUND_TPROXY_ROUTE_TABLE", "150"),
        (&["--resolv-conf", resolv], &["--redirect-dns"], "REDIRECT_DNS", "true"),
        (&["--resolv-conf", resolv], &["--redirect-dns"], "ISTIO_META_DNS_CAPTURE", "1"),
        (&["--redirect-dns"], &["--capture-all-dns"], "CAPTURE_ALL_DNS", "true"),
        (&[], &["--drop-invalid"], "DROP_INVALID", "true"),
        (&[], &["--drop-invalid"], "INVALID_DROP", "True"),
        (&[], &["--outbound-owner-groups", "202"], "ISTIO_OUTBOUND_OWNER_GROUPS", "202"),
        (&[], &["--outbound-owner-groups-exclude", "888"], "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888"),
        (&[], &["--outbound-ipv4-loopback-cidr", "127.0.0.1/8"], "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8"),
    ];
    for (base, flag, var, value) in cases {
        let by_flag = dry_run(&[base, *flag].concat(), &[]);
        let by_env = dry_run(base, &[(var, value)]);
        assert_eq!(by_env, by_flag, "{var}={value} must give the rules of {flag:?}");
        assert_ne!(by_env, dry_run(base, &[]), "{var}={value} changes the rules");
    }
}

#[test]
fn defaults_are_istio_iptables_defaults() {
    let spelled_out = [
        "-p", "15001", "-z", "15006", "-e", "15008", "-u", "1337", "-g", "1337", "-i", "", "-b", "", "-m", "REDIRECT",
        "-t", "1337", "-r", "133",
    ];
    assert_eq!(dry_run(&[], &[]), dry_run(&spelled_out, &[]));
}

#[test]
fn dual_stack_follows_istio_dual_stack() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh-init"));
    cmd.args(["iptables", "--dry-run"]).env_clear().env("ISTIO_DUAL_STACK", "true");
    let out = cmd.output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("# IPv6"), "ISTIO_DUAL_STACK programs IPv6 too");
}

/// istio-iptables' operational flags are accepted; `--reconcile` and `--force-apply` describe
/// what mesh-init always does, so the rules are the same.
#[test]
fn operational_flags_are_accepted() {
    let plain = dry_run(&["-i", "*"], &[]);
    for flags in
        [&["--reconcile"][..], &["--force-apply"], &["--iptables-probe-port", "15003", "--probe-timeout", "2s"]]
    {
        assert_eq!(dry_run(&[&["-i", "*"][..], flags].concat(), &[]), plain, "{flags:?}");
    }
    assert_eq!(dry_run(&["-i", "*"], &[("RECONCILE", "true"), ("FORCE_IPTABLES_BINARY", "")]), plain);
    // The CNI plugin's mode locks the pod's namespace file: without a namespace there is none.
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-init")).args(["iptables", "--cni-mode"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cni-mode"), "the error names the flag");
}
