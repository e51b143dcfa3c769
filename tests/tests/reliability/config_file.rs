//! (1) An empty or half-written config file is never applied; `/ready` keeps saying whether a
//! valid config is served. (2) A Kubernetes ConfigMap update (the kubelet swapping the `..data`
//! link) is seen.

use std::{io::Write, os::unix::fs::symlink, thread, time::Duration};

use mesh_lab::{privileged, wait_until};

use super::lab::{admin_get, Client, Lab, Load, ADMIN, B1, B2, ECHO_PY, SERVICE};

/// One route from [`SERVICE`] to cluster `to`; clusters `a` (B1) and `b` (B2).
fn two_clusters(to: &str) -> String {
    format!(
        "admin: {{ address: {ADMIN} }}
readiness: {{ address: 0.0.0.0:15021 }}
listeners:
  - {{ name: virtual, address: 0.0.0.0:15000 }}
routes:
  - name: svc
    destinations: [\"{SERVICE}\"]
    protocol: http
    rules: [{{ clusters: [{{ name: {to} }}] }}]
clusters:
  - {{ name: a, connect_timeout: 1s }}
  - {{ name: b, connect_timeout: 1s }}
endpoints:
  - {{ cluster: a, addresses: [\"{B1}\"] }}
  - {{ cluster: b, addresses: [\"{B2}\"] }}
"
    )
}

fn two_backends(lab: &mut Lab) {
    for (name, addr) in [("b1", B1), ("b2", B2)] {
        let (ip, port) = addr.split_once(':').unwrap();
        lab.backend(ECHO_PY, &[name, ip, port]);
    }
}

fn answered_by() -> String {
    Client::connect(SERVICE).and_then(|mut c| c.get("/")).map(|r| r.body_text()).unwrap_or_default()
}

fn ready_on_both_ports() -> bool {
    let readiness = Client::connect("10.200.0.1:15021").and_then(|mut c| c.get("/ready")).map(|r| r.status);
    admin_get("/ready").0 == 200 && matches!(readiness, Ok(200))
}

#[test]
fn an_emptied_config_file_is_rejected_and_the_proxy_stays_ready() {
    if !privileged("an_emptied_config_file_is_rejected_and_the_proxy_stays_ready") {
        return;
    }
    let mut lab = Lab::new("rempty");
    two_backends(&mut lab);
    lab.start_proxy(&two_clusters("a"));
    lab.net.pod.run(|| {
        let load = Load::start();
        thread::sleep(Duration::from_millis(200));
        // `: > proxy.yaml`: truncated in place.
        std::fs::File::create(&lab.config).unwrap();
        let dump = wait_until(Duration::from_secs(5), "the empty file's rejection", || {
            let dump = admin_get("/config_dump").1;
            dump.contains("the config is empty").then_some(dump)
        });
        assert!(dump.contains("\"listeners\": [\n"), "{dump}");
        thread::sleep(Duration::from_millis(300));
        let (total, failed) = load.finish();
        assert_eq!(failed, 0, "{failed} of {total} requests failed after the file was emptied");
        assert!(ready_on_both_ports(), "/ready is not 200 on both ports");
        assert!(answered_by().starts_with("b1 "));
    });
}

#[test]
fn a_config_file_written_in_place_is_read_once_complete() {
    if !privileged("a_config_file_written_in_place_is_read_once_complete") {
        return;
    }
    let mut lab = Lab::new("rhalf");
    two_backends(&mut lab);
    lab.start_proxy(&two_clusters("a"));
    let next = two_clusters("b");
    // The cut: cluster b is defined, its endpoints are not written yet (still a valid config).
    let cut = next.find("  - { cluster: b,").unwrap();
    lab.net.pod.run(|| {
        let load = Load::start();
        thread::sleep(Duration::from_millis(200));
        let mut f = std::fs::File::create(&lab.config).unwrap();
        f.write_all(next[..cut].as_bytes()).unwrap();
        f.flush().unwrap();
        // An editor, a `kubectl cp`, a script writing in steps: the file is incomplete meanwhile.
        thread::sleep(Duration::from_millis(700));
        f.write_all(next[cut..].as_bytes()).unwrap();
        drop(f);
        wait_until(Duration::from_secs(5), "answers from b2", || answered_by().starts_with("b2 ").then_some(()));
        thread::sleep(Duration::from_millis(200));
        let (total, failed) = load.finish();
        assert_eq!(failed, 0, "{failed} of {total} requests failed while the file was being written");
    });
}

#[test]
fn a_configmap_update_by_the_kubelet_is_applied() {
    if !privileged("a_configmap_update_by_the_kubelet_is_applied") {
        return;
    }
    let mut lab = Lab::new("rcm");
    two_backends(&mut lab);
    // A ConfigMap volume as the kubelet lays it out (its atomic writer).
    let volume = lab.dir.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    let version = |n: u32, to: &str| {
        let d = volume.join(format!("..2026_11_28_12_00_0{n}.000000001"));
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("proxy.yaml"), two_clusters(to)).unwrap();
        d.file_name().unwrap().to_owned()
    };
    let first = version(1, "a");
    symlink(&first, volume.join("..data")).unwrap();
    symlink("..data/proxy.yaml", volume.join("proxy.yaml")).unwrap();
    lab.config = volume.join("proxy.yaml");
    lab.spawn_proxy();
    lab.wait_ready();
    lab.net.pod.run(|| assert!(answered_by().starts_with("b1 ")));

    // The update: a new timestamped directory, `..data_tmp` pointing at it renamed over `..data`,
    // the old directory removed. No event names proxy.yaml.
    let second = version(2, "b");
    symlink(&second, volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
    std::fs::remove_dir_all(volume.join(&first)).unwrap();
    lab.net.pod.run(|| {
        wait_until(Duration::from_secs(5), "the ConfigMap update applied", || {
            answered_by().starts_with("b2 ").then_some(())
        })
    });

    // And the next one, now that the watch follows the new directory.
    let third = version(3, "a");
    symlink(&third, volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
    std::fs::remove_dir_all(volume.join(&second)).unwrap();
    lab.net.pod.run(|| {
        wait_until(Duration::from_secs(5), "the second ConfigMap update applied", || {
            answered_by().starts_with("b1 ").then_some(())
        })
    });
}
