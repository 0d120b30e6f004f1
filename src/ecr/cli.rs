//! The `pullthrough ecr` subcommands and their runner. `main.rs` parses them, loads the config
//! (exit 64 on errors), and calls [`run`] on a runtime; everything the commands print goes to
//! the writer it is given, progress bars to stderr only when it is a terminal.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_sdk_ecr::Client;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use super::setup::{Action, Target};
use super::{EcrOpsError, aws, check, cleanup, pods, setup, warm, warm_report};
use crate::config::Config;
use crate::mirror::forward::Forwarder;
use crate::mirror::metrics::Metrics;
use crate::mirror::token::{EcrTokenSource, TokenCache};

/// `pullthrough ecr …`.
#[derive(Subcommand, Debug)]
pub enum EcrCommand {
    /// Create or update the pull-through cache rules, repository creation templates and registry
    /// policy the config asks for. Prints the plan; changes nothing without --apply.
    Setup {
        /// Config file (TOML).
        #[arg(long, env = "PULLTHROUGH_CONFIG")]
        config: PathBuf,
        /// Make the changes (default: only print the plan).
        #[arg(long)]
        apply: bool,
    },
    /// Health report: rules, credentials, templates, registry policy, token, and optional pulls.
    /// Exits 1 when any check fails.
    Check {
        /// Config file (TOML).
        #[arg(long, env = "PULLTHROUGH_CONFIG")]
        config: PathBuf,
        /// Also fetch this image's manifest by tag through ECR and report the time to first
        /// byte (repeatable, e.g. one small image per upstream).
        #[arg(long = "pull", value_name = "IMAGE")]
        pull: Vec<String>,
    },
    /// Fetch images' manifests by tag through ECR (and every platform manifest of an index), so
    /// that ECR caches them before a digest-pinned pod needs them; for `name:tag@digest`, check
    /// that ECR then serves the digest. Exits 1 if any warm failed or Ctrl-C stopped it.
    Warm {
        /// Config file (TOML).
        #[arg(long, env = "PULLTHROUGH_CONFIG")]
        config: PathBuf,
        /// A file with one image a line (`#` comments allowed).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Warm the images of the pods and workloads in a Kubernetes JSON document, e.g. the
        /// output of `kubectl get pods -A -o json` (`-` reads stdin). Images on no configured
        /// upstream, and images pinned by digest alone, are reported and skipped.
        #[arg(long, value_name = "FILE|-")]
        from_pods: Option<PathBuf>,
        /// Images fetched at once.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        concurrency: u16,
        /// Images, e.g. `alpine:3.19` or `quay.io/prometheus/node-exporter:v1.8.2`.
        images: Vec<String>,
    },
    /// List the repositories under a pull-through prefix with image count and size; delete
    /// them (with their images) only with --apply.
    Cleanup {
        /// Config file (TOML).
        #[arg(long, env = "PULLTHROUGH_CONFIG")]
        config: PathBuf,
        /// The repository prefix, e.g. `docker-hub` or `docker-hub/library`.
        #[arg(long)]
        prefix: String,
        /// Delete them (default: only list).
        #[arg(long)]
        apply: bool,
        /// Allow a prefix that is not (under) a configured pull-through prefix.
        #[arg(long)]
        any_prefix: bool,
    },
}

impl EcrCommand {
    /// The config file the command reads.
    pub fn config(&self) -> &Path {
        match self {
            EcrCommand::Setup { config, .. }
            | EcrCommand::Check { config, .. }
            | EcrCommand::Warm { config, .. }
            | EcrCommand::Cleanup { config, .. } => config,
        }
    }
}

fn progress(len: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}") {
        bar.set_style(style);
    }
    bar
}

/// Runs one `ecr` command. `Ok(false)` means it ran but something failed (exit 1).
pub async fn run(
    config: Config,
    command: EcrCommand,
    out: &mut (dyn Write + Send),
) -> Result<bool, EcrOpsError> {
    // Installed before any slow call, so Ctrl-C during cleanup never kills a delete midway: the
    // first signal stops the listing at once or lets the delete in flight finish (`stop`); a
    // second one gives up waiting for it (`abort`). Warm likewise starts no warm after the
    // first, lets those in flight end, and drops them on the second; either way it still
    // prints what was done.
    let stop = CancellationToken::new();
    let abort = CancellationToken::new();
    // Warm's input is read before the handlers take over Ctrl-C, so an interrupted read of
    // stdin ends the process as any program's would.
    let warm_input = match &command {
        EcrCommand::Warm {
            file,
            from_pods,
            images,
            ..
        } => Some(warm_input(images, file.as_deref(), from_pods.as_deref())?),
        _ => None,
    };
    if matches!(
        command,
        EcrCommand::Cleanup { .. } | EcrCommand::Warm { .. }
    ) {
        watch_signals(stop.clone(), abort.clone()).map_err(|e| EcrOpsError::Api {
            op: "signal handlers",
            message: e.to_string(),
        })?;
    }
    let sdk = aws::sdk_config(&config).await;
    let region = sdk.region().map(|r| r.to_string());
    let client = Client::new(&sdk);
    match command {
        EcrCommand::Setup { apply, .. } => {
            let target = aws::resolve_target(&config, &client, region.as_deref()).await?;
            run_setup(&config, &client, &target, apply, out).await
        }
        EcrCommand::Check { pull, .. } => {
            let fetcher = fetcher(&config, &client, region.as_deref()).map_err(|e| e.to_string());
            let checks =
                check::run(&config, &client, region.as_deref(), fetcher.as_ref(), &pull).await;
            out.write_all(check::render(&checks).as_bytes())?;
            Ok(!checks.iter().any(|c| c.status == check::Status::Fail))
        }
        EcrCommand::Warm { concurrency, .. } => {
            let input = warm_input.unwrap_or_default();
            let jobs = warm::plan(&config.upstreams, &input.named, &input.found);
            let fetcher = fetcher(&config, &client, region.as_deref())?;
            let bar = progress(jobs.len() as u64);
            let tick = bar.clone();
            let results = warm::warm_all(
                &fetcher,
                jobs,
                usize::from(concurrency),
                &stop,
                &abort,
                move || tick.inc(1),
            )
            .await;
            bar.finish_and_clear();
            if let Some(header) = &input.header {
                writeln!(out, "{header}")?;
            }
            out.write_all(warm_report::render(&results).as_bytes())?;
            let interrupted = results
                .iter()
                .filter(|w| matches!(w.outcome, warm::Outcome::Interrupted))
                .count();
            if interrupted > 0 {
                return Err(EcrOpsError::Interrupted(format!(
                    "interrupted: {interrupted} image(s) not warmed (listed above); run it again \
                     to warm them"
                )));
            }
            Ok(!results.iter().any(warm::Warmed::is_failure))
        }
        EcrCommand::Cleanup {
            prefix,
            apply,
            any_prefix,
            ..
        } => {
            let prefix = cleanup::check_prefix(&config, &prefix, any_prefix)?;
            let run = run_cleanup(&client, &prefix, apply, &stop, out);
            tokio::select! {
                r = run => r,
                // Dropping the delete in flight is safe for the repository (ECR deletes it
                // whole or not at all), only we no longer learn which.
                () = abort.cancelled() => Err(EcrOpsError::Interrupted(
                    "interrupted twice: stopped without waiting for the delete in flight, which \
                     ECR completes whole or not at all; run cleanup again to see what is left"
                        .into(),
                )),
            }
        }
    }
}

/// What warm was asked to warm, read before any request.
#[derive(Debug, Default)]
struct WarmInput {
    /// Named on the command line or in `--file`: each must be warmable.
    named: Vec<String>,
    /// Found by `--from-pods`: whatever the cluster runs.
    found: Vec<String>,
    /// What `--from-pods` read, printed above the report.
    header: Option<String>,
}

/// Reads `--file` and `--from-pods` (`-`: stdin). Anything unreadable is a usage error naming
/// the file (exit 64), before any request.
fn warm_input(
    images: &[String],
    file: Option<&Path>,
    from_pods: Option<&Path>,
) -> Result<WarmInput, EcrOpsError> {
    let mut input = WarmInput {
        named: images.to_vec(),
        ..WarmInput::default()
    };
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| EcrOpsError::Usage(format!("--file {}: cannot read: {e}", f.display())))?;
        input.named.extend(warm_report::parse_images_file(&text));
    }
    if let Some(p) = from_pods {
        let stdin = p == Path::new("-");
        let label = if stdin {
            "- (stdin)".to_owned()
        } else {
            p.display().to_string()
        };
        let text = if stdin {
            std::io::read_to_string(std::io::stdin())
        } else {
            std::fs::read_to_string(p)
        }
        .map_err(|e| EcrOpsError::Usage(format!("--from-pods {label}: cannot read: {e}")))?;
        let found = pods::images_from_json(&text)
            .map_err(|e| EcrOpsError::Usage(format!("--from-pods {label}: {e}")))?;
        input.header = Some(pods_header(&label, &found));
        input.found = found.images;
    } else if input.named.is_empty() {
        return Err(EcrOpsError::Usage(
            "name at least one image, or --file with one image a line, or --from-pods".into(),
        ));
    }
    Ok(input)
}

/// `--from-pods pods.json: 42 objects, 17 images (left out: 3 Service).` Pure.
fn pods_header(label: &str, found: &pods::Found) -> String {
    let mut s = format!(
        "--from-pods {label}: {} object(s) with a pod spec, {} image(s)",
        found.objects,
        found.images.len()
    );
    if !found.ignored.is_empty() {
        let kinds: Vec<String> = found
            .ignored
            .iter()
            .map(|(kind, n)| format!("{n} {kind}"))
            .collect();
        s.push_str(&format!(" (left out, no pod spec: {})", kinds.join(", ")));
    }
    s.push('.');
    s
}

/// SIGINT/SIGTERM during cleanup and warm: the first cancels `stop`, the second `abort`.
fn watch_signals(stop: CancellationToken, abort: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        for token in [stop, abort] {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            token.cancel();
        }
    });
    Ok(())
}

/// Cleanup: list (stopped at once by `stop`), print, and delete with `apply`.
async fn run_cleanup(
    client: &Client,
    prefix: &str,
    apply: bool,
    stop: &CancellationToken,
    out: &mut (dyn Write + Send),
) -> Result<bool, EcrOpsError> {
    let listing = cleanup::list(client, prefix, stop).await?;
    out.write_all(cleanup::render_list(prefix, &listing).as_bytes())?;
    let listed_all = listing.skipped.is_empty();
    if !apply {
        writeln!(
            out,
            "Dry run: nothing deleted. Run again with --apply to delete these repositories and their images."
        )?;
        return Ok(listed_all);
    }
    let repos = &listing.repos;
    let bar = progress(repos.len() as u64);
    let tick = bar.clone();
    let deleted = cleanup::delete(client, repos, stop, move |name| {
        tick.set_message(name.to_owned());
        tick.inc(1);
    })
    .await;
    bar.finish_and_clear();
    let interrupted = stop.is_cancelled() && !deleted.untouched.is_empty();
    out.write_all(cleanup::render_deleted(&deleted, interrupted).as_bytes())?;
    Ok(listed_all && deleted.failed.is_empty() && deleted.untouched.is_empty())
}

/// The manifest fetcher for warm and `check --pull`: the mirror's client, token cache and
/// registry URL.
fn fetcher(
    config: &Config,
    client: &Client,
    region: Option<&str>,
) -> Result<warm::Fetcher, EcrOpsError> {
    let forwarder = Forwarder::new(&config.timeouts, config.ecr.ca_file.as_deref())
        .map_err(|e| EcrOpsError::Usage(e.to_string()))?;
    let base = config
        .ecr
        .registry_base(region)
        .map_err(|e| EcrOpsError::Usage(e.to_string()))?;
    let tokens = TokenCache::new(
        Arc::new(EcrTokenSource::new(client.clone())),
        Metrics::new().0,
    );
    Ok(warm::Fetcher::new(forwarder, tokens, base))
}

/// Setup: observe, plan, print, and apply with `apply`.
pub async fn run_setup(
    config: &Config,
    client: &Client,
    target: &Target,
    apply: bool,
    out: &mut (dyn Write + Send),
) -> Result<bool, EcrOpsError> {
    let desired = setup::desired(config, target)?;
    let observed = aws::observe(client, desired.node_statement.is_some()).await?;
    let plan = setup::plan(&desired, &observed).map_err(|e| EcrOpsError::Api {
        op: "GetRegistryPolicy",
        message: e.to_string(),
    })?;
    out.write_all(setup::render(&plan).as_bytes())?;
    if plan.count(Action::Conflict) > 0 {
        writeln!(
            out,
            "Resolve the conflicts above first; nothing was changed."
        )?;
        return Ok(false);
    }
    if !apply {
        if plan.has_changes() {
            writeln!(
                out,
                "Dry run: nothing changed. Run again with --apply to make these changes."
            )?;
        } else {
            writeln!(out, "Everything is as configured.")?;
        }
        return Ok(true);
    }
    let applied = aws::apply(client, &plan).await?;
    let mut ok = true;
    for a in applied
        .iter()
        .filter(|a| !matches!(a.step.op, setup::Op::None))
    {
        let verb = match a.step.action {
            Action::Create => "created",
            _ => "updated",
        };
        match &a.result {
            Ok(()) => writeln!(out, "{verb} {} {}", a.step.kind, a.step.name)?,
            Err(e) => {
                ok = false;
                writeln!(out, "FAILED {} {}: {e}", a.step.kind, a.step.name)?;
            }
        }
    }
    let changed = applied
        .iter()
        .filter(|a| !matches!(a.step.op, setup::Op::None) && a.result.is_ok())
        .count();
    writeln!(
        out,
        "Applied {changed} change(s){}.",
        if ok { "" } else { "; some failed (above)" }
    )?;
    Ok(ok)
}
