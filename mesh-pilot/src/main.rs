//! `mesh-pilot`: the control plane's command line.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_pilot::{
    adapter::files,
    analysis::Level,
    model::{Registry, Store},
    translate::{Options, Translator},
};

#[derive(Parser)]
#[command(name = "mesh-pilot", version, about = "The mesh's control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reports what Istio's analyzers would about a set of files (exit 1 when an error is found).
    Analyze {
        /// Files or directories of Kubernetes-format YAML (Services, EndpointSlices, Pods, Istio rules).
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// `text` (istioctl's format with file and line) or `json`.
        #[arg(short, long, default_value = "text")]
        output: Output,
        /// The cluster domain.
        #[arg(long, default_value = mesh_pilot::model::DEFAULT_DOMAIN)]
        domain: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mesh-pilot: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Analyze { files: paths, output, domain } => {
            let mut store = Store::default();
            store.apply(files::read(&paths).context("analyze")?);
            let opts = Options { domain, ..Options::default() };
            let registry = Registry::build(&store, &opts.domain);
            let findings = Translator::new(&store, &registry, &opts).analyze();
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&findings)?),
                Output::Text if findings.is_empty() => {
                    println!("✔ No validation issues found when analyzing {}", names(&paths))
                }
                Output::Text => findings.iter().for_each(|f| println!("{f}")),
            }
            let failed = findings.iter().any(|f| f.level == Level::Error);
            Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
    }
}

fn names(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}
