//! The DNS proxy of a whole in-process proxy, asked by `dig` over UDP and TCP: the config's names
//! and their search-domain forms answered from the config (and changed by a reload), other types
//! and names forwarded — here to a nameserver that is not there, so SERVFAIL — and its counters.
//! Forwarding to a real resolver, the cache and glibc's resolver through mesh-init's capture are
//! in tests/tests/protocols.rs (they need port 53 in a namespace of their own).

mod support;

use std::{net::SocketAddr, process::Command};

use support::{InProcess, TempDir};

fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+tries=1", "+time=3"])
        .args(args)
        .output()
        .expect("dig (bind9-dnsutils, scripts/setup.sh)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn config(dir: &TempDir, hosts: &str) -> String {
    let resolv = dir.write(
        "resolv.conf",
        // Nothing listens there: a forwarded query fails at once (port unreachable).
        "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver 127.0.0.254\noptions timeout:1\n",
    );
    format!(
        "admin: {{ address: \"{{admin}}\" }}\ndns: {{ addresses: [\"127.0.0.1:0\"], resolv_conf: \"{}\" }}\nhosts:\n{hosts}",
        resolv.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_names_are_answered_and_the_rest_forwarded() {
    let dir = TempDir::new("dns");
    let hosts = "  - { name: reviews.default.svc.cluster.local, addresses: [10.96.0.20, \"fd00:96::20\"] }\n  - { name: ratings.example, addresses: [10.96.0.30] }\n";
    let proxy = InProcess::start(&config(&dir, hosts)).await;
    let server = proxy.bound.dns[0];
    let d = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            dig(server, &args)
        })
    };
    for name in ["reviews", "reviews.default", "reviews.default.svc", "Reviews.Default.Svc.Cluster.Local."] {
        assert_eq!(d(&[name, "A", "+short"]).await.unwrap(), "10.96.0.20", "{name}");
        assert_eq!(d(&[name, "AAAA", "+short", "+tcp"]).await.unwrap(), "fd00:96::20", "{name} over TCP");
    }
    // A name with no IPv6 address: NOERROR with no answer (the name exists).
    let nodata = d(&["ratings.example", "AAAA"]).await.unwrap();
    assert!(nodata.contains("status: NOERROR") && nodata.contains("ANSWER: 0"), "{nodata}");
    assert!(nodata.contains("flags: qr aa rd ra"), "{nodata}");
    // Not the config's: forwarded; with no upstream there, SERVFAIL (not silence).
    let other = d(&["other.example", "A"]).await.unwrap();
    assert!(other.contains("status: SERVFAIL"), "{other}");
    // Another type of a configured name goes upstream too (as Istio's agent does).
    assert!(d(&["reviews", "MX"]).await.unwrap().contains("status: SERVFAIL"));

    // A reload changes the answers.
    proxy.rewrite(&config(&dir, "  - { name: reviews.default.svc.cluster.local, addresses: [10.96.0.21] }\n"));
    support::wait_until_async(std::time::Duration::from_secs(5), "the reloaded names", || async {
        (d(&["reviews", "A", "+short"]).await.unwrap() == "10.96.0.21").then_some(())
    })
    .await;
    let stats = proxy.admin("/stats/prometheus").await.1;
    for want in [
        "mesh_proxy_dns_queries_total{transport=\"udp\",answer=\"failed\"} 2",
        "mesh_proxy_dns_queries_total{transport=\"tcp\",answer=\"local\"} 4",
    ] {
        assert!(stats.contains(want), "{want} in {stats}");
    }
}

#[tokio::test]
async fn a_bad_hosts_section_is_refused_naming_the_field() {
    let dir = TempDir::new("dns");
    let cfg = |hosts: &str| config(&dir, hosts).replace("{admin}", "127.0.0.1:0");
    let path = dir.write("proxy.yaml", &cfg("  - { name: \"bad name\", addresses: [10.0.0.1] }\n"));
    let loaded = mesh_proxy::config::load(&path, &Default::default()).unwrap();
    let err = loaded.routing.validate(&loaded.bootstrap).unwrap_err().to_string();
    assert_eq!(err, "hosts[0].name: \"bad name\" is not a DNS name (labels of letters, digits, '-', '_')");
    let path = dir.write("proxy.yaml", &cfg("  - { name: a.example, addresses: [10.0.0.256] }\n"));
    let loaded = mesh_proxy::config::load(&path, &Default::default()).unwrap();
    let err = loaded.routing.validate(&loaded.bootstrap).unwrap_err().to_string();
    assert_eq!(err, "hosts[0].addresses[0]: \"10.0.0.256\" is not an IPv4 or IPv6 address");
}
