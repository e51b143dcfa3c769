//! (6) A large config is built in linear time, and the admin API and the readiness port answer
//! while it is being built: once, a 10,000-route reload held `/ready` for 78 s.
//!
//! How long a build takes is measured, not asserted: `cargo xtask config-scale` (README). Here
//! 5,000 routes of 10 endpoints each (debug builds parse slowly), and the behaviour: `/ready`
//! answered on both ports between "config file read" and "configuration applied", traffic served
//! throughout.

use std::time::Duration;

use mesh_lab::{privileged, wait_until};

use super::lab::{admin_get, Client, Lab, Load, ADMIN, B1, ECHO_PY, SERVICE};

/// `routes` routes (`svc-N.ns:80`), each with its own cluster of 10 endpoints, plus the route
/// the test's traffic takes; `variant` changes every endpoint's port so a rewrite is a new
/// config throughout.
pub fn large_config(routes: usize, variant: u16) -> String {
    let mut y = format!(
        "admin: {{ address: {ADMIN} }}\nreadiness: {{ address: 0.0.0.0:15021 }}\nlisteners:\n  - {{ name: virtual, address: 0.0.0.0:15000 }}\nroutes:\n  - {{ name: svc, destinations: [\"{SERVICE}\"], protocol: http, rules: [{{ clusters: [{{ name: backend }}] }}] }}\n"
    );
    for i in 0..routes {
        y.push_str(&format!(
            "  - {{ name: r{i}, destinations: [\"svc-{i}.ns:80\"], protocol: http, rules: [{{ clusters: [{{ name: c{i} }}] }}] }}\n"
        ));
    }
    y.push_str("clusters:\n  - { name: backend }\n");
    for i in 0..routes {
        y.push_str(&format!("  - {{ name: c{i} }}\n"));
    }
    y.push_str(&format!("endpoints:\n  - {{ cluster: backend, addresses: [\"{B1}\"] }}\n"));
    for i in 0..routes {
        let eps: Vec<String> =
            (0..10).map(|j| format!("\"10.200.{}.{}:{}\"", 10 + i / 256, i % 256, 8000 + variant + j)).collect();
        y.push_str(&format!("  - {{ cluster: c{i}, addresses: [{}] }}\n", eps.join(", ")));
    }
    y
}

#[test]
fn ready_answers_while_a_large_config_is_built() {
    if !privileged("ready_answers_while_a_large_config_is_built") {
        return;
    }
    let mut lab = Lab::new("rscale");
    let (ip, port) = B1.split_once(':').unwrap();
    lab.backend(ECHO_PY, &["b1", ip, port]);
    lab.write_config(&large_config(5_000, 0));
    lab.spawn_proxy();
    lab.wait_ready_within(Duration::from_secs(60));
    lab.net.pod.run(|| {
        let load = Load::start();
        lab.write_config(&large_config(5_000, 100));
        // The reload has begun: the file is read (and is being parsed and built) ...
        let version = wait_until(Duration::from_secs(30), "the reload to begin", || {
            let log = lab.log_text();
            let line = log.lines().rev().find(|l| l.contains("config file read; applying it"))?;
            line.split("version=").nth(1)?.split_whitespace().next().map(str::to_string)
        });
        // ... and both ports answer meanwhile.
        assert_eq!(admin_get("/ready"), (200, "LIVE\n".to_string()));
        let readiness = Client::connect("10.200.0.1:15021").and_then(|mut c| c.get("/ready")).unwrap();
        assert_eq!((readiness.status, readiness.body_text()), (200, "LIVE\n".to_string()));
        let applied = format!("file={version}");
        let log = lab.log_text();
        assert!(
            !log.lines().any(|l| l.contains("configuration applied") && l.contains(&applied)),
            "/ready was answered only after the build: {version}"
        );
        wait_until(Duration::from_secs(60), "the large config applied", || {
            lab.log_text().lines().any(|l| l.contains("configuration applied") && l.contains(&applied)).then_some(())
        });
        let (total, failed) = load.finish();
        assert_eq!(failed, 0, "{failed} of {total} requests failed during the reload");
    });
}
