//! A whole proxy started in this process by `app::build`: what it binds and reports, and what a
//! reload may change (the routing) and may not (the bootstrap).

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_0_is_bound_reported_and_known_as_the_proxys_own() {
    let yaml = "admin: { address: \"{admin}\" }\nlisteners: [{ name: main, address: \"127.0.0.1:0\" }]\n";
    let proxy = InProcess::start(yaml).await;
    assert_ne!(proxy.bound.admin.port(), 0);
    assert_eq!(proxy.bound.listeners.len(), 1);
    let listen = proxy.bound.listeners[0].address;
    assert_eq!(proxy.bound.listeners[0].name, "main");
    assert_ne!(listen.port(), 0);
    assert_eq!(proxy.admin("/ready").await, (200, "LIVE\n".into()));

    // Straight to the listener, no route: refused as the proxy's own address. Were the listener
    // known by its configured 127.0.0.1:0, the connection would look inbound (loopback is local)
    // and the proxy would connect to itself, again and again.
    let stats = unrouted_connection_closed(listen, proxy.bound.admin).await;
    assert!(
        stats.contains("mesh_proxy_downstream_connections_total{listener=\"main\"} 1"),
        "one connection, no loop: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_file_source_and_refuses_a_bootstrap_change() {
    let v1 = Backend::start("v1").await;
    let listen = free_addr();
    let rules = |c: &str| format!("      - clusters: [{{ name: {c} }}]");
    let yaml = |c: &str| listener_route(listen, "http", &rules(c), &[("v1", &[v1.addr]), ("v2", &[v1.addr])]);
    let proxy = InProcess::start(&yaml("v1")).await;
    let source = format!("file:{}", proxy.config.display());
    assert_eq!(proxy.config_dump().await["source"], source);

    // A routing change is applied, and the source keeps its name (it used to become `file`).
    proxy.rewrite(&yaml("v2"));
    let dump = wait_until_async(Duration::from_secs(5), "the reload", || async {
        let dump = proxy.config_dump().await;
        (dump["config"]["routes"][0]["rules"][0]["clusters"][0]["name"] == "v2").then_some(dump)
    })
    .await;
    assert_eq!(dump["source"], source);
    let version = dump["version"].clone();

    // A bootstrap change is refused as a whole, naming the field; the routing in force stays.
    proxy.rewrite(&format!("drain_timeout: 10s\n{}", yaml("v1")));
    let dump = wait_until_async(Duration::from_secs(5), "the rejection", || async {
        let dump = proxy.config_dump().await;
        (!dump["last_rejected"].is_null()).then_some(dump)
    })
    .await;
    assert_eq!(
        dump["last_rejected"]["error"],
        "drain_timeout cannot change while running (5s → 10s); restart to change it"
    );
    assert_eq!(dump["version"], version);
    assert_eq!(dump["config"]["drain_timeout"], "5s");
    assert_eq!(dump["config"]["routes"][0]["rules"][0]["clusters"][0]["name"], "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_discovery_address_holds_across_reloads() {
    let v1 = Backend::start("v1").await;
    let listen = free_addr();
    let rules = |c: &str| format!("      - clusters: [{{ name: {c} }}]");
    let yaml = |c: &str| listener_route(listen, "http", &rules(c), &[("v1", &[v1.addr]), ("v2", &[v1.addr])]);
    // Nothing listens there: the proxy keeps polling and serves the file meanwhile.
    let overrides = mesh_proxy::config::Overrides::discovery_address("127.0.0.1:9", Some("bookinfo")).unwrap();
    let file =
        |c: &str| format!("discovery: {{ url: http://127.0.0.1:8500/elsewhere, poll_interval: 2s }}\n{}", yaml(c));
    let proxy = InProcess::start_with(&file("v1"), &overrides).await;
    let dump = proxy.config_dump().await;
    assert_eq!(dump["config"]["discovery"]["url"], "http://127.0.0.1:9/ns/bookinfo");
    assert_eq!(dump["config"]["discovery"]["poll_interval"], "2s", "the file's other discovery fields stay");

    // The reloaded file gets the flag too: the same bootstrap, so its routing change is applied,
    // not refused as a discovery.url change.
    proxy.rewrite(&file("v2"));
    let dump = wait_until_async(Duration::from_secs(5), "the reload", || async {
        let dump = proxy.config_dump().await;
        (dump["config"]["routes"][0]["rules"][0]["clusters"][0]["name"] == "v2").then_some(dump)
    })
    .await;
    assert!(dump["last_rejected"].is_null(), "{dump}");
    assert_eq!(dump["config"]["discovery"]["url"], "http://127.0.0.1:9/ns/bookinfo");
}
