//! The `pullthrough` command line. Everything real lives in the library; this file parses
//! arguments, sets up logging, and maps errors to exit codes (64 for bad config or usage).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use pullthrough::config::{Config, ConfigError};

/// `EX_USAGE`: bad command line or config.
const EXIT_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Send every image pull through the AWS account's ECR pull-through cache"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "PULLTHROUGH_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the mirror (and the ops listener) until SIGTERM.
    Serve {
        /// Config file (TOML).
        #[arg(long, env = "PULLTHROUGH_CONFIG")]
        config: PathBuf,
    },
    /// Write containerd hosts.toml files naming this mirror, one per configured upstream.
    Hosts {
        /// Config file (TOML).
        #[arg(long, env = "PULLTHROUGH_CONFIG")]
        config: PathBuf,
        /// containerd's certs.d directory.
        #[arg(long, default_value = "/etc/containerd/certs.d")]
        dir: PathBuf,
    },
    /// Validate a config file and exit.
    CheckConfig {
        /// Config file (TOML).
        #[arg(long, env = "PULLTHROUGH_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_tracing(cli.log_format);
    let config_path = match &cli.command {
        Command::Serve { config }
        | Command::Hosts { config, .. }
        | Command::CheckConfig { config } => config.clone(),
    };
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let result = match cli.command {
        Command::Serve { .. } => run_serve(config),
        Command::Hosts { dir, .. } => run_hosts(&config, &dir),
        Command::CheckConfig { .. } => {
            println!(
                "{}: ok ({} upstreams)",
                config_path.display(),
                config.upstreams.len()
            );
            Ok(true)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("pullthrough: {e:#}");
            // A region that cannot be found is a config problem, like any other.
            match e.downcast_ref::<pullthrough::ServeError>() {
                Some(pullthrough::ServeError::NoRegion) => ExitCode::from(EXIT_USAGE),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("pullthrough: {e}");
    ExitCode::from(EXIT_USAGE)
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::prelude::*;
    let env = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // At TRACE the AWS SDK logs raw response bodies and output structs, and the
    // GetAuthorizationToken output carries the token in clear. No RUST_LOG may turn that on.
    let no_secrets = tracing_subscriber::filter::filter_fn(|meta| {
        !(*meta.level() == tracing::Level::TRACE && meta.target().starts_with("aws_"))
    });
    let registry = tracing_subscriber::registry().with(env).with(no_secrets);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
        LogFormat::Text => registry.with(fmt).init(),
    }
}

fn run_serve(config: Config) -> anyhow::Result<bool> {
    // One crypto provider for every TLS client in the process (ours and the AWS SDK's).
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One thread: a blob's bytes hop between the ECR connection's task and the client
    // connection's task, and on a multi-threaded runtime each hop can wake another CPU. One
    // thread used 16 % less CPU per GiB streamed (bench/NOTES.md); the work is kernel copies.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let shutdown = pullthrough::signal::shutdown().context("installing signal handlers")?;
        let mirror = bind(config.listen).await.context("binding `listen`")?;
        let ops = bind(config.ops_listen)
            .await
            .context("binding `ops_listen`")?;
        tracing::info!(listen = %config.listen, ops_listen = %config.ops_listen, "listening");
        if !config.listen.ip().is_loopback() {
            tracing::warn!(
                listen = %config.listen,
                "the mirror is not on loopback: anything that reaches it pulls with this node's ECR identity"
            );
        }
        let drained = pullthrough::serve(config, mirror, ops, shutdown).await?;
        if !drained {
            tracing::warn!("exiting with requests still in flight after the shutdown grace period");
        }
        // A drain cut short by the grace period is still the shutdown that was asked for.
        Ok(true)
    })
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

fn run_hosts(config: &Config, dir: &std::path::Path) -> anyhow::Result<bool> {
    let written = pullthrough::hosts::write_all(config, dir)?;
    for p in written {
        println!("{}", p.display());
    }
    Ok(true)
}
