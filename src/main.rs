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

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum HostsFormat {
    /// containerd certs.d/<registry>/hosts.toml files.
    Containerd,
    /// A containers-registries.conf(5) drop-in (CRI-O, podman, skopeo).
    RegistriesConf,
    /// Bottlerocket settings (TOML for user data or `apiclient apply`).
    Bottlerocket,
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
    /// Write containerd hosts.toml files naming this mirror, one per configured upstream; or
    /// remove them; or print the same routing for CRI-O/podman or Bottlerocket.
    Hosts {
        /// Config file (TOML). Not needed with --remove.
        #[arg(long, env = "PULLTHROUGH_CONFIG", required_unless_present = "remove")]
        config: Option<PathBuf>,
        /// containerd's certs.d directory.
        #[arg(long, default_value = "/etc/containerd/certs.d")]
        dir: PathBuf,
        /// Remove every file pullthrough wrote under --dir and restore the files it merged into.
        #[arg(long, conflicts_with = "format")]
        remove: bool,
        /// What to produce: containerd files in --dir, or a registries.conf drop-in or
        /// Bottlerocket settings on stdout.
        #[arg(long, value_enum, default_value_t = HostsFormat::Containerd)]
        format: HostsFormat,
    },
    /// The DaemonSet's installer: wait for the mirror, check containerd, install hosts.toml
    /// files and keep them right; or, with --remove, take them out. Exits on SIGTERM, leaving
    /// the files in place.
    Node {
        /// Config file (TOML), the mirror's.
        #[arg(long, env = "PULLTHROUGH_CONFIG")]
        config: PathBuf,
        /// Where the host's / is mounted.
        #[arg(long, default_value = "/")]
        host_root: PathBuf,
        /// containerd's certs.d, as a host path.
        #[arg(long, default_value = "/etc/containerd/certs.d")]
        certs_dir: String,
        /// containerd's config file, as a host path.
        #[arg(long, default_value = "/etc/containerd/config.toml")]
        containerd_config: String,
        /// containerd's version on this node (`2.1`, or what `containerd --version` prints), for
        /// the config_path check: a `version = 2` config reads differently on 1.x and 2.x, and
        /// 2.1 differs from 2.0. Without it the agent reads /etc/eks/containerd-version.txt
        /// under --host-root (EKS AL2023), else assumes 2.1 or later where it matters.
        #[arg(long, env = "PULLTHROUGH_CONTAINERD_VERSION", value_parser = parse_containerd_version)]
        containerd_version: Option<pullthrough::node::containerd_config::Version>,
        /// The agent's own /healthz, /readyz and /metrics. Loopback unless asked: the DaemonSet
        /// passes `0.0.0.0:5052` for kubelet probes on the node IP.
        #[arg(long, default_value = "127.0.0.1:5052")]
        listen: SocketAddr,
        /// How often to re-check containerd and re-install the files.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        resync: std::time::Duration,
        /// Uninstall: remove pullthrough's files, then idle as ready.
        #[arg(long)]
        remove: bool,
    },
    /// Validate a config file and exit.
    CheckConfig {
        /// Config file (TOML).
        #[arg(long, env = "PULLTHROUGH_CONFIG")]
        config: PathBuf,
    },
    /// Set up, check, warm and clean up the account's ECR pull-through cache.
    Ecr {
        #[command(subcommand)]
        command: pullthrough::ecr::cli::EcrCommand,
    },
    /// Run the mutating admission webhook (HTTPS `/mutate`, plus probes and metrics) until SIGTERM.
    Webhook {
        /// Config file (TOML).
        #[arg(long, env = "PULLTHROUGH_CONFIG")]
        config: PathBuf,
    },
    /// Show how the webhook normalizes and rewrites each image.
    Rewrite {
        /// Config file (TOML).
        #[arg(long, env = "PULLTHROUGH_CONFIG")]
        config: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Image references, as written in pod specs.
        #[arg(required = true)]
        images: Vec<String>,
    },
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum Output {
    Text,
    Json,
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
    // One crypto provider for every TLS client in the process: ours, the AWS SDK's, and the
    // webhook's server side.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Command::Hosts {
        remove: true, dir, ..
    } = &cli.command
    {
        return exit(run_remove(dir));
    }
    let config_path = match &cli.command {
        Command::Serve { config }
        | Command::Node { config, .. }
        | Command::CheckConfig { config }
        | Command::Webhook { config }
        | Command::Rewrite { config, .. } => config.clone(),
        Command::Hosts { config, .. } => config.clone().unwrap_or_default(),
        Command::Ecr { command } => command.config().to_owned(),
    };
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let result = match cli.command {
        Command::Serve { .. } => run_serve(config),
        Command::Hosts { dir, format, .. } => run_hosts(&config, &dir, format),
        Command::Node {
            host_root,
            certs_dir,
            containerd_config,
            containerd_version,
            listen,
            resync,
            remove,
            ..
        } => run_node(
            config,
            listen,
            pullthrough::node::NodeOptions {
                host_root,
                certs_dir,
                containerd_config,
                containerd_version,
                resync,
                remove,
            },
        ),
        Command::Ecr { command } => return run_ecr(config, command),
        Command::CheckConfig { .. } => {
            println!(
                "{}: ok ({} upstreams)",
                config_path.display(),
                config.upstreams.len()
            );
            Ok(true)
        }
        Command::Webhook { .. } => run_webhook(config),
        Command::Rewrite { output, images, .. } => run_rewrite(&config, output, &images),
    };
    exit(result)
}

fn parse_containerd_version(
    s: &str,
) -> Result<pullthrough::node::containerd_config::Version, String> {
    pullthrough::node::containerd_config::Version::parse(s)
        .ok_or_else(|| format!("{s:?} names no containerd version (expected e.g. 2.1 or 1.7.24)"))
}

fn exit(result: anyhow::Result<bool>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("pullthrough: {e:#}");
            // A region that cannot be found is a config problem, like any other.
            match e.downcast_ref::<pullthrough::mirror::ServeError>() {
                Some(pullthrough::mirror::ServeError::NoRegion(_)) => ExitCode::from(EXIT_USAGE),
                _ if e
                    .downcast_ref::<pullthrough::webhook::WebhookError>()
                    .is_some_and(|w| w.is_usage()) =>
                {
                    ExitCode::from(EXIT_USAGE)
                }
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
    // `level` and `target=level` directives, comma-separated. Not `EnvFilter`: its span and
    // field filters need the regex engine, half a megabyte of code resident on every node for a
    // feature no one filters a proxy's log with.
    let env = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
        });
    // At TRACE the AWS SDK logs raw response bodies and output structs, and the
    // GetAuthorizationToken output carries the token in clear. No RUST_LOG may turn that on.
    let no_secrets = tracing_subscriber::filter::filter_fn(|meta| {
        !(*meta.level() == tracing::Level::TRACE && meta.target().starts_with("aws_"))
    });
    let registry = tracing_subscriber::registry().with(env).with(no_secrets);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR").as_deref(),
        ));
    match format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
        LogFormat::Text => registry.with(fmt).init(),
    }
}

/// Colour codes only on a terminal: in a file, a pipe or a container log they are noise that
/// breaks grep. And never with `NO_COLOR` set to anything but the empty string (no-color.org).
fn colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

fn run_serve(config: Config) -> anyhow::Result<bool> {
    // All the CPUs the pod may use: on a node, concurrent pulls (TLS to ECR, manifests, and
    // blob bytes from endpoints that do not redirect) would otherwise share one core.
    let runtime = runtime(Threads::Workers(config.server.worker_threads))?;
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
        let drained = pullthrough::mirror::serve(config, mirror, ops, shutdown).await?;
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

fn run_hosts(config: &Config, dir: &std::path::Path, format: HostsFormat) -> anyhow::Result<bool> {
    use pullthrough::node::hosts;
    match format {
        HostsFormat::Containerd => {
            print_reports(&pullthrough::node::install::install(config, dir)?)
        }
        HostsFormat::RegistriesConf => print!("{}", hosts::render_registries_conf(config)),
        HostsFormat::Bottlerocket => print!("{}", hosts::render_bottlerocket(config)),
    }
    Ok(true)
}

fn run_remove(dir: &std::path::Path) -> anyhow::Result<bool> {
    let reports = pullthrough::node::install::remove(dir)?;
    if reports.is_empty() {
        println!("{}: no files of pullthrough's", dir.display());
    }
    print_reports(&reports);
    Ok(true)
}

fn print_reports(reports: &[pullthrough::node::install::Report]) {
    for r in reports {
        println!("{}: {}", r.path.display(), r.change);
    }
}

fn run_node(
    config: Config,
    listen: SocketAddr,
    opts: pullthrough::node::NodeOptions,
) -> anyhow::Result<bool> {
    let runtime = runtime(Threads::One)?;
    runtime.block_on(async move {
        let shutdown = pullthrough::signal::shutdown().context("installing signal handlers")?;
        let listener = bind(listen).await.context("binding --listen")?;
        tracing::info!(%listen, remove = opts.remove, "node agent listening");
        pullthrough::node::run(config, opts, listener, shutdown).await?;
        Ok(true)
    })
}

/// The region the webhook's ECR host is in when `ecr.region` is unset: the environment's, with
/// no IMDS or profile lookup (without warming the webhook runs without an AWS identity).
fn env_region() -> Option<String> {
    ["AWS_REGION", "AWS_DEFAULT_REGION"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

fn run_webhook(config: Config) -> anyhow::Result<bool> {
    use pullthrough::webhook::WebhookServer;
    let own_namespace = std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|v| !v.is_empty());
    let server = WebhookServer::new(&config, env_region().as_deref(), own_namespace.as_deref())?;
    let runtime = runtime(Threads::Workers(config.server.worker_threads))?;
    let w = &config.webhook;
    runtime.block_on(async move {
        let shutdown = pullthrough::signal::shutdown().context("installing signal handlers")?;
        let https = bind(w.listen).await.context("binding `webhook.listen`")?;
        let ops = bind(w.ops_listen)
            .await
            .context("binding `webhook.ops_listen`")?;
        tracing::info!(
            listen = %w.listen,
            ops_listen = %w.ops_listen,
            mode = w.mode.as_str(),
            warm = w.warm,
            namespace = own_namespace.as_deref().unwrap_or("-"),
            "webhook listening"
        );
        if !server.run(https, ops, shutdown).await? {
            tracing::warn!("exiting with requests still in flight after the shutdown grace period");
        }
        Ok(true)
    })
}

fn run_rewrite(config: &Config, output: Output, images: &[String]) -> anyhow::Result<bool> {
    use pullthrough::webhook::explain;
    let rules = pullthrough::webhook::rules(config, env_region().as_deref())?;
    let rows = explain::explain(images, &rules);
    match output {
        Output::Text => print!("{}", explain::render_text(&rows)),
        Output::Json => print!("{}", explain::render_json(&rows)),
    }
    Ok(true)
}

/// `pullthrough ecr …`: 0 when everything passed, 1 when something failed, 64 for usage.
fn run_ecr(config: Config, command: pullthrough::ecr::cli::EcrCommand) -> ExitCode {
    // One worker per CPU, whatever `[server] worker_threads` says: that key is for the
    // long-running commands, and an `ecr` command is a client that comes and goes.
    let runtime = match runtime(Threads::Workers(None)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pullthrough: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout();
    match runtime.block_on(pullthrough::ecr::cli::run(config, command, &mut out)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("pullthrough: {e}");
            if e.is_usage() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// How many threads a command's runtime runs on.
enum Threads {
    /// One: the node agent, which reconciles files once a minute and answers probes.
    One,
    /// Workers for a command that serves traffic: the configured number, or one per CPU.
    Workers(Option<usize>),
}

/// The async runtime.
fn runtime(threads: Threads) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::Workers(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(pullthrough::server::worker_threads(n));
            b
        }
    };
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

#[cfg(test)]
mod tests {
    use super::colour;
    use std::ffi::OsStr;

    #[rstest::rstest]
    #[case::terminal(true, None, true)]
    #[case::file_or_pipe(false, None, false)]
    #[case::no_color(true, Some("1"), false)]
    #[case::no_color_any_value(true, Some("false"), false)]
    #[case::no_color_empty_is_unset(true, Some(""), true)]
    #[case::no_color_and_a_pipe(false, Some("1"), false)]
    fn colour_only_on_a_terminal_without_no_color(
        #[case] terminal: bool,
        #[case] no_color: Option<&str>,
        #[case] want: bool,
    ) {
        assert_eq!(colour(terminal, no_color.map(OsStr::new)), want);
    }
}
