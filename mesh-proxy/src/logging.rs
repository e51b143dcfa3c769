//! Logging: `tracing` to stderr, as text or JSON lines, with a filter the admin API can change.
//!
//! Access-log lines use the target `access`, so they can be switched off or on alone
//! (`--log-level info,access=off`, or `POST /logging?level=info,access=off`); they are not
//! `tracing` events but are formatted and batched by [`access`], off the request path.

pub mod access;

use tracing_subscriber::{filter::EnvFilter, fmt, layer::SubscriberExt, reload, util::SubscriberInitExt, Registry};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid log level {directives:?}: {reason}")]
    Filter { directives: String, reason: String },
    #[error("a global logger is already installed")]
    AlreadySet,
    #[error("starting the access log's writer thread: {0}")]
    AccessWriter(std::io::Error),
}

/// Changes the filter of the installed subscriber.
#[derive(Clone)]
pub struct LogHandle(reload::Handle<EnvFilter, Registry>);

fn filter(directives: &str) -> Result<EnvFilter, Error> {
    EnvFilter::builder()
        .parse(directives)
        .map_err(|e| Error::Filter { directives: directives.to_string(), reason: e.to_string() })
}

/// Installs the global subscriber. `directives` is an `EnvFilter` string: `info`, `debug`,
/// `info,access=off`, `mesh_proxy=debug`.
pub fn init(directives: &str, format: LogFormat) -> Result<LogHandle, Error> {
    let (layer, handle) = reload::Layer::new(filter(directives)?);
    let registry = tracing_subscriber::registry().with(layer);
    let result = match format {
        LogFormat::Text => {
            use std::io::IsTerminal;
            let ansi = std::io::stderr().is_terminal();
            registry.with(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr)).try_init()
        }
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_current_span(false).with_writer(std::io::stderr))
            .try_init(),
    };
    result.map_err(|_| Error::AlreadySet)?;
    access::start(format).map_err(Error::AccessWriter)?;
    Ok(LogHandle(handle))
}

impl LogHandle {
    pub fn set(&self, directives: &str) -> Result<(), Error> {
        let f = filter(directives)?;
        self.0.reload(f).map_err(|e| Error::Filter { directives: directives.to_string(), reason: e.to_string() })?;
        // Callsites cache whether they are enabled; make them ask again.
        tracing::callsite::rebuild_interest_cache();
        Ok(())
    }
}
