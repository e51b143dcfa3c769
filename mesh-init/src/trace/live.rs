//! `mesh-init trace --live`: the rules installed in the current network namespace, read back
//! (`iptables-save`, or `nft -j list table` for native nftables) into plans the evaluator follows.

use crate::{
    iptables::{self, Backend, BackendChoice, NftInstalled},
    rules::{self, Family, Plan},
};

/// What is installed, per family.
pub struct Live {
    /// Where the rules were read: `native nftables`, or the iptables flavour.
    pub source: String,
    /// IPv4, IPv6.
    pub plans: [Plan; 2],
    /// Rules in the chains a packet may meet that are not mesh-init's vocabulary: the trace
    /// cannot follow them and says so.
    pub unknown: Vec<String>,
}

/// Native nftables rules of ours when there are any, else the iptables rules of `choice`.
pub fn read(choice: BackendChoice) -> Result<Live, iptables::Error> {
    if iptables::nft_available() {
        let v4 = NftInstalled::read(Family::V4)?;
        let v6 = NftInstalled::read(Family::V6)?;
        if v4.rule_count() + v6.rule_count() > 0 {
            let unknown = v4.unknown.iter().chain(&v6.unknown).cloned().collect();
            return Ok(Live { source: "native nftables".into(), plans: [v4.plan, v6.plan], unknown });
        }
    }
    let backend = Backend::select(choice)?;
    let mut unknown = Vec::new();
    let mut read = |family: Family| -> Result<Plan, iptables::Error> {
        let saved = iptables::command(&backend.save_binary(family), &[])?;
        let (plan, mut u) = rules::parse_saved(family, &saved);
        unknown.append(&mut u);
        Ok(plan)
    };
    let plans = [read(Family::V4)?, read(Family::V6)?];
    Ok(Live { source: format!("iptables ({backend})"), plans, unknown })
}
