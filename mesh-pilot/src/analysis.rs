//! Findings: what `mesh-pilot analyze` prints and `/debug/analyze` serves, in the shape of
//! `istioctl analyze` (`Error [IST0101] (VirtualService reviews.default) ...`) plus the field and
//! the line. They come from three places: objects that do not parse, the translation (every field
//! it cannot carry, every reference it cannot resolve) and the checks below that need the whole
//! model (a subset selecting no endpoint).
//!
//! Codes: Istio's where Istio's analyzers report the same thing (IST0101 ReferencedResourceNotFound,
//! IST0106 SchemaValidationError, IST0109 ConflictingMeshGatewayVirtualServiceHosts, IST0111
//! MultipleSidecarsWithoutWorkloadSelectors, IST0112 VirtualServiceDestinationPortSelectorRequired);
//! `MP0xxx` for what is particular to mesh-pilot and its proxy.

use std::fmt;

use serde::Serialize;

use crate::resource::{Meta, ParseError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Level {
    Error,
    Warning,
    Info,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Code {
    /// IST0101: a host, subset or other object named that does not exist.
    ReferencedResourceNotFound,
    /// IST0106: a value Istio's schema or validation refuses (weights not adding to 100, a bad
    /// duration); also objects that do not parse.
    SchemaValidationError,
    /// IST0109: two VirtualServices for the same host, both applying to sidecars.
    ConflictingMeshGatewayVirtualServiceHosts,
    /// IST0111: two Sidecars without a workload selector in one namespace.
    MultipleSidecarsWithoutWorkloadSelectors,
    /// IST0112: a destination on a multi-port service without `port`.
    VirtualServiceDestinationPortSelectorRequired,
    /// MP0001: a field mesh-proxy cannot carry (yet): ignored, and said so.
    NotCarriedByProxy,
    /// MP0002: a DestinationRule subset that selects no ready endpoint (requests to it get 503).
    SubsetSelectsNoEndpoints,
    /// MP0003: two DestinationRules define the same subset of a host.
    ConflictingSubsets,
}

impl Code {
    pub fn id(self) -> &'static str {
        match self {
            Code::ReferencedResourceNotFound => "IST0101",
            Code::SchemaValidationError => "IST0106",
            Code::ConflictingMeshGatewayVirtualServiceHosts => "IST0109",
            Code::MultipleSidecarsWithoutWorkloadSelectors => "IST0111",
            Code::VirtualServiceDestinationPortSelectorRequired => "IST0112",
            Code::NotCarriedByProxy => "MP0001",
            Code::SubsetSelectsNoEndpoints => "MP0002",
            Code::ConflictingSubsets => "MP0003",
        }
    }

    pub fn level(self) -> Level {
        match self {
            Code::ReferencedResourceNotFound
            | Code::SchemaValidationError
            | Code::ConflictingMeshGatewayVirtualServiceHosts
            | Code::MultipleSidecarsWithoutWorkloadSelectors
            | Code::ConflictingSubsets => Level::Error,
            Code::VirtualServiceDestinationPortSelectorRequired
            | Code::NotCarriedByProxy
            | Code::SubsetSelectsNoEndpoints => Level::Warning,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Finding {
    pub level: Level,
    pub code: Code,
    /// `VirtualService default/reviews`.
    pub resource: String,
    /// `spec.http[0].route[1].destination.subset`; empty for the whole object.
    pub field: String,
    /// The file, or `kubernetes`.
    pub source: String,
    pub line: Option<usize>,
    pub message: String,
}

impl Finding {
    pub fn new(code: Code, meta: &Meta, field: impl Into<String>, message: impl Into<String>) -> Finding {
        let field = field.into();
        Finding {
            level: code.level(),
            code,
            resource: meta.key.to_string(),
            line: meta.origin.line(&field),
            source: meta.origin.source.clone(),
            field,
            message: message.into(),
        }
    }

    pub fn parse_error(e: &ParseError) -> Finding {
        Finding {
            level: Level::Error,
            code: Code::SchemaValidationError,
            resource: e.resource.clone(),
            field: e.field.clone(),
            source: e.file.clone(),
            line: e.line,
            message: e.reason.clone(),
        }
    }
}

impl fmt::Display for Finding {
    /// `Error [IST0101] (VirtualService default/reviews) rules.yaml:12 spec.http[0]...: message`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} [{}] ({}) {}", self.level, self.code.id(), self.resource, self.source)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if !self.field.is_empty() {
            write!(f, " {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The findings of one build, in a stable order, without duplicates.
#[derive(Debug, Clone, Default)]
pub struct Findings(std::collections::BTreeSet<Finding>);

impl Findings {
    pub fn push(&mut self, f: Finding) {
        self.0.insert(f);
    }

    pub fn add(&mut self, code: Code, meta: &Meta, field: impl Into<String>, message: impl Into<String>) {
        self.push(Finding::new(code, meta, field, message));
    }

    /// Every key of `other` at `path`: a field present in the input that is not carried.
    pub fn not_carried(&mut self, meta: &Meta, path: &str, other: &crate::istio::Other) {
        for key in other.keys() {
            let field = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
            self.add(Code::NotCarriedByProxy, meta, field, format!("`{key}` is not carried by mesh-proxy: ignored"));
        }
    }

    pub fn into_vec(self) -> Vec<Finding> {
        self.0.into_iter().collect()
    }
}
