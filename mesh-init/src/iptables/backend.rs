//! Which iptables: legacy (x_tables) or nf_tables.
//!
//! Both backends can be loaded in one kernel, and rules written through one are invisible to the
//! other's `-save`; writing to the wrong one leaves the pod with two rule sets that fight. Like
//! kube-proxy and istio-iptables we follow what is already in use: rules present in the legacy
//! tables mean legacy; otherwise nf_tables when its binaries work; otherwise plain `iptables`.

use std::{fmt, path::PathBuf};

use super::Error;
use crate::rules::Family;

/// What the user asked for with `--iptables-backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Auto,
    Legacy,
    Nft,
}

impl BackendChoice {
    /// istio-iptables' values (`legacy`, `nft`, or empty for automatic) and `auto`.
    pub fn parse(s: &str) -> Result<BackendChoice, String> {
        match s.trim() {
            "" | "auto" => Ok(BackendChoice::Auto),
            "legacy" => Ok(BackendChoice::Legacy),
            "nft" => Ok(BackendChoice::Nft),
            other => Err(format!("expected auto (or empty), legacy or nft, got {other:?}")),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Legacy => "legacy",
            BackendChoice::Nft => "nft",
        })
    }
}

/// The iptables flavour in use, resolved to binaries that exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
    /// `iptables-restore` without a suffix: whatever the distribution's alternative points at.
    Plain,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
            Backend::Plain => "iptables (system default)",
        })
    }
}

impl Backend {
    fn name(self, family: Family, tool: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        match self {
            Backend::Legacy => format!("{base}-legacy-{tool}"),
            Backend::Nft => format!("{base}-nft-{tool}"),
            Backend::Plain => format!("{base}-{tool}"),
        }
    }

    pub fn restore_binary(self, family: Family) -> String {
        resolve(&self.name(family, "restore"))
    }

    pub fn save_binary(self, family: Family) -> String {
        resolve(&self.name(family, "save"))
    }

    /// Resolves the user's choice against the binaries present and the rules already in the
    /// current network namespace.
    pub fn select(choice: BackendChoice) -> Result<Backend, Error> {
        let have = |b: Backend| find(&b.name(Family::V4, "restore")).is_some();
        match choice {
            BackendChoice::Legacy if have(Backend::Legacy) => Ok(Backend::Legacy),
            BackendChoice::Nft if have(Backend::Nft) => Ok(Backend::Nft),
            BackendChoice::Legacy => Err(Error::BackendMissing(choice, Backend::Legacy.name(Family::V4, "restore"))),
            BackendChoice::Nft => Err(Error::BackendMissing(choice, Backend::Nft.name(Family::V4, "restore"))),
            BackendChoice::Auto => {
                if have(Backend::Legacy) && has_rules(Backend::Legacy) {
                    Ok(Backend::Legacy)
                } else if have(Backend::Nft) && super::command(&Backend::Nft.save_binary(Family::V4), &[]).is_ok() {
                    Ok(Backend::Nft)
                } else if have(Backend::Plain) {
                    Ok(Backend::Plain)
                } else {
                    Err(Error::NotInstalled {
                        tried: "iptables-legacy-restore, iptables-nft-restore, iptables-restore".into(),
                    })
                }
            }
        }
    }
}

impl Backend {
    /// The iptables flavours whose tools are installed (where rules of ours may be).
    pub fn installed() -> Vec<Backend> {
        [Backend::Legacy, Backend::Nft].into_iter().filter(|b| find(&b.name(Family::V4, "restore")).is_some()).collect()
    }
}

/// True when the backend's tables hold any rule (not just empty built-in chains).
fn has_rules(b: Backend) -> bool {
    [Family::V4, Family::V6]
        .into_iter()
        .any(|f| super::command(&b.save_binary(f), &[]).is_ok_and(|out| out.lines().any(|l| l.starts_with("-A "))))
}

/// Where a binary is: `PATH`, then the sbin directories a non-login root shell may lack.
pub(super) fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub(super) fn resolve(name: &str) -> String {
    find(name).map_or_else(|| name.to_string(), |p| p.to_string_lossy().into_owned())
}
