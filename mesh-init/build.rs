//! With the `ebpf` feature, builds the `mesh-ebpf` programs for the BPF target (aya-build runs
//! `cargo +<nightly> build -Z build-std=core --target bpfel-unknown-none`, linked by bpf-linker,
//! with the nightly named in `rust-toolchain-nightly`: pinned, so that two builds a month apart
//! carry the same programs)
//! into `OUT_DIR/mesh-ebpf`, which `ebpf/attach.rs` embeds. Without the feature, nothing: the
//! iptables mode builds on a machine without the eBPF toolchain.

fn main() {
    #[cfg(feature = "ebpf")]
    ebpf::build();
}

#[cfg(feature = "ebpf")]
mod ebpf {
    use std::path::Path;

    pub fn build() {
        let here = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        let root = Path::new(&here).parent().expect("mesh-init is inside the workspace");
        let programs = root.join("mesh-ebpf");
        // aya-build watches the programs' crate; the shared types matter too. (Not PATH: a
        // different PATH under sudo or nsenter would rebuild the object for nothing.)
        println!("cargo:rerun-if-changed={}", root.join("mesh-ebpf-common").display());
        println!("cargo:rerun-if-changed={}", root.join("mesh-common").display());
        let package = aya_build::Package {
            name: "mesh-ebpf",
            root_dir: programs.to_str().expect("workspace path is UTF-8"),
            ..Default::default()
        };
        let pin = root.join("rust-toolchain-nightly");
        println!("cargo:rerun-if-changed={}", pin.display());
        let nightly = std::fs::read_to_string(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
        let nightly = nightly.trim();
        if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::Custom(nightly)) {
            panic!(
                "building the eBPF programs failed: {e:#}\n\
                 They need {nightly} with rust-src and bpf-linker (scripts/setup.sh installs both), \
                 or build without them: cargo build --no-default-features (iptables mode only)"
            );
        }
    }
}
