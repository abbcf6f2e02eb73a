//! `skybridge`: the command line. Thin by design: it reads files, calls the
//! pure core (validate, plan) and the renderers, prints, and writes files.

mod agent;
mod apply;
mod check;
mod cost;
mod down;
mod graph;
mod join;
mod keys;
mod lab;
mod load;
mod man;
mod output;
mod status;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use skybridge_core::{State, plan, table};
use skybridge_render::Format;

use output::Output;

/// Exit codes, one meaning each (the agent's `try`/`confirm` keep their own
/// for `apply`, documented there).
pub mod exit {
    /// A runtime failure: a file that cannot be read, a node that cannot be reached.
    pub const RUNTIME: u8 = 1;
    /// Invalid input: the command line (clap's own code) or a cluster or
    /// state file that does not validate. Nothing was changed.
    pub const INVALID_INPUT: u8 = 2;
    /// The command ran on several nodes and some of them failed or could
    /// not be reached (`apply`, `down`, `join` over SSH, `lab check`) or are
    /// unhealthy (`status`, `lab status`); the summary says which.
    pub const NODES_FAILED: u8 = 3;
}

const AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  runtime failure (a file that cannot be read, a node that cannot be reached); also a question
     answered no, or not asked for want of a terminal (give --yes); nothing was changed
  2  invalid input: the command line (also an unknown --node), or a cluster or state file that
     does not validate; nothing was changed
  3  some nodes failed or could not be reached (apply, down, join over SSH, lab check) or are
     unhealthy or unreachable (status, lab status, check); the summary names them

Logging:
  -v/-q set how much the commands say (-v: steps and files read, -vv: debug, -q: errors only);
  SKYBRIDGE_LOG (e.g. SKYBRIDGE_LOG=debug, SKYBRIDGE_LOG=skybridge_agent=trace) overrides them.
  The agent logs at info unless SKYBRIDGE_LOG says otherwise.";

#[derive(Debug, Parser)]
#[command(
    name = "skybridge",
    version,
    about = "One Kubernetes cluster across VMs of several cloud providers",
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Say more: -v the steps and the files read, -vv debug details.
    #[arg(long, short, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,
    /// Say only errors: no warnings about the cluster file, no progress lines.
    #[arg(long, short, global = true)]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent: reconcile this node's network onto its plan and keep it there.
    Agent(agent::AgentArgs),
    /// Prepare VMs as Kubernetes nodes: kernel settings, containerd, kubelet, kube-proxy.
    Join(join::JoinArgs),
    /// Reach every node over SSH, install the agent and the cluster file, collect
    /// keys, show the changes, apply them (rolled back on a node that cannot be
    /// reached again) and verify connectivity.
    Apply(apply::ApplyArgs),
    /// Every node's health over SSH (as apply reaches it): agent running and
    /// its version, converged with the file or what differs, last reconcile
    /// and drift repairs, active gateways, and per tunnel peer the last
    /// handshake, bytes each way and the probe RTT and loss. Exit 3 when a
    /// node is unhealthy or unreachable.
    Status(status::StatusArgs),
    /// Measure the network over SSH (as apply reaches the nodes), with the
    /// agent on every node: the all-pairs matrix of reachability, RTT and
    /// loss; the MTU usable between each pair of sites' gateways against
    /// the plan's; with --throughput the TCP rate between them. Exit 3 when
    /// a node is unreachable or a path is narrower than planned.
    Check(check::CheckArgs),
    /// Take Skybridge off every node over SSH: the agent's network down,
    /// then its unit, files, WireGuard key and binary removed.
    Down(down::DownArgs),
    /// The whole multi-provider topology on this machine, in network namespaces.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// The userspace WireGuard data plane of one interface (started by the agent).
    #[command(hide = true)]
    WireguardDataplane {
        /// Interface name, e.g. sb-wg0.
        iface: String,
        /// Where the node's private key lives.
        #[arg(long, default_value = agent::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Print the version, the commit and date it was built from, and its target.
    Version,
    /// Write a commented starter cluster file (two providers, documentation addresses).
    Init {
        /// Where to write it; an existing file is never overwritten.
        #[arg(default_value = "cluster.yaml")]
        file: PathBuf,
    },
    /// Print a shell completion script (e.g. `skybridge completions bash > /etc/bash_completion.d/skybridge`).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Check a cluster file and report every problem with its line and column.
    Validate {
        /// The cluster file (YAML).
        file: PathBuf,
        /// table: the diagnostics for reading (on stderr); json, yaml: one
        /// document with every diagnostic, on stdout.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print the JSON Schema of the cluster file (for editors and CI checks).
    Schema,
    /// Write the manual pages (skybridge.1 and one per subcommand, e.g.
    /// skybridge-lab-up.1) into a folder, for `man -l` or /usr/share/man/man1.
    Man {
        /// The folder to write the pages into (created if missing; pages of the same name are replaced).
        dir: PathBuf,
    },
    /// Show what every node will get: tunnels, peers, routes, sysctls, firewall rules.
    Plan {
        /// The cluster file (YAML).
        file: PathBuf,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
        /// table: for reading; json, yaml: the whole plan, for scripts.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Public keys collected from the nodes [default: <file>.state.yaml beside the cluster file].
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// Draw the topology: sites (provider, region), nodes and their roles,
    /// tunnels with transport and MTU. SVG (no Graphviz needed) or DOT, on
    /// standard output.
    Graph {
        /// The cluster file (YAML).
        file: PathBuf,
        /// svg: a picture drawn by skybridge itself; dot: Graphviz's language.
        #[arg(long, value_enum, default_value_t = graph::GraphFormat::Svg)]
        format: graph::GraphFormat,
        /// Draw what the nodes report now, asked over SSH as `status` asks:
        /// each tunnel up (green, with RTT and traffic) or down (red), the
        /// active gateway each site's nodes name, nodes that do not answer.
        #[arg(long)]
        live: bool,
        /// Seconds between the two readings of the tunnels' counters (`--live`).
        #[arg(long, default_value_t = 3, requires = "live")]
        sample: u64,
        /// Record the host keys of nodes never contacted before (`--live`).
        #[arg(long, requires = "live")]
        accept_new_host_keys: bool,
        /// Public keys collected from the nodes [default: <file>.state.yaml beside the cluster file].
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// What the cluster costs per site and month (from the sites' `costs` and
    /// the nodes' `vcpus`/`memoryGiB`), and where its workers would be cheaper.
    Cost {
        /// The cluster file (YAML).
        file: PathBuf,
        /// Price the cross-site traffic flowing now: every tunnel end's
        /// transmit counter, read twice over SSH (as `status` reads it),
        /// projected to a month.
        #[arg(long)]
        live: bool,
        /// Seconds between the two readings of `--live`.
        #[arg(long, default_value_t = 10, requires = "live")]
        sample: u64,
        /// Record the host keys of nodes never contacted before (`--live`).
        #[arg(long, requires = "live")]
        accept_new_host_keys: bool,
        /// table: for reading; json, yaml: for scripts.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Write per-node artifacts for applying the plan by hand.
    Render {
        /// The cluster file (YAML).
        file: PathBuf,
        /// Which artifacts to write.
        #[arg(long, value_enum)]
        format: RenderFormat,
        /// The folder to write into, one sub-folder per node. It must be
        /// empty, missing, or hold an earlier render of the same format.
        #[arg(long, value_name = "DIR", required_unless_present = "out")]
        dir: Option<PathBuf>,
        /// The old name of --dir (it read like --output, which is a report format elsewhere).
        #[arg(long, value_name = "DIR", hide = true, conflicts_with = "dir")]
        out: Option<PathBuf>,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
        /// WireGuard: generate every node's key pair into the output folder (mode 0600)
        /// instead of leaving a placeholder for the node's own key.
        #[arg(long)]
        generate_keys: bool,
        /// Public keys collected from the nodes [default: <file>.state.yaml beside the cluster file].
        #[arg(long)]
        state: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RenderFormat {
    /// skybridge-net.sh (up/down) and a systemd unit that runs it.
    Script,
    /// systemd-networkd files, a sysctl.d file and an nftables ruleset.
    Networkd,
    /// The nftables ruleset of the tunnel ends.
    Nftables,
    /// wg-quick configurations (WireGuard clusters only).
    Wireguard,
    /// The systemd unit that runs the agent at boot.
    SystemdAgent,
    /// Per `intraSite: vpc-routes` site: its VPC route-table entries and the
    /// gateway instances' settings, as the provider's commands.
    CloudRoutes,
}

impl From<RenderFormat> for Format {
    fn from(f: RenderFormat) -> Self {
        match f {
            RenderFormat::Script => Format::Script,
            RenderFormat::Networkd => Format::Networkd,
            RenderFormat::Nftables => Format::Nftables,
            RenderFormat::Wireguard => Format::WireGuard,
            RenderFormat::SystemdAgent => Format::SystemdAgent,
            RenderFormat::CloudRoutes => Format::CloudRoutes,
        }
    }
}

/// What `skybridge init` writes.
const STARTER: &str = include_str!("starter.yaml");

fn main() -> ExitCode {
    let cli = Cli::parse();
    let agent_logs_itself = matches!(
        cli.command,
        Command::Agent(_) | Command::WireguardDataplane { .. }
    );
    if !agent_logs_itself {
        init_logging(cli.verbose, cli.quiet);
    }
    load::set_quiet(cli.quiet);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            if let Some(invalid) = e.downcast_ref::<load::Invalid>() {
                if !invalid.reported {
                    eprintln!("error: {e:#}");
                }
                return ExitCode::from(exit::INVALID_INPUT);
            }
            eprintln!("error: {e:#}");
            ExitCode::from(exit::RUNTIME)
        }
    }
}

/// Logs go to stderr; `SKYBRIDGE_LOG` (an `EnvFilter`) wins over -v/-q.
fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SKYBRIDGE_LOG")
        .unwrap_or_else(|_| level.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: the agent's log is read in journald
        // and in files, where escape codes are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
        .init();
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Agent(args) => agent::main(args),
        Command::Join(args) => join::main(args),
        Command::Apply(args) => apply::main(args),
        Command::Status(args) => status::main(args),
        Command::Check(args) => check::main(args),
        Command::Down(args) => down::main(args),
        Command::Lab(cmd) => lab::main(cmd),
        Command::WireguardDataplane { iface, state_dir } => agent::dataplane(&iface, &state_dir),
        Command::Version => {
            println!(
                "skybridge {} (commit {}, built {}, {})",
                env!("CARGO_PKG_VERSION"),
                env!("SKYBRIDGE_COMMIT"),
                env!("SKYBRIDGE_BUILD_DATE"),
                env!("SKYBRIDGE_TARGET")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Init { file } => {
            use std::io::Write as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&file)
                .with_context(|| {
                    format!(
                        "creating {} (an existing file is never overwritten: pick another name)",
                        file.display()
                    )
                })?;
            f.write_all(STARTER.as_bytes())
                .with_context(|| format!("writing {}", file.display()))?;
            println!(
                "wrote {0}: edit its sites and nodes, then `skybridge validate {0}`",
                file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "skybridge",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema => {
            print!("{}", skybridge_core::schema::json());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            use clap::CommandFactory as _;
            let n = man::write(Cli::command(), &dir)?;
            println!("wrote {n} manual page(s) under {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { file, output } => validate(&file, output),
        Command::Plan {
            file,
            node,
            output,
            state,
        } => {
            let cluster = load::cluster(&file)?;
            let state = load::state(&file, state.as_deref())?;
            let plan = plan(&cluster, &state);
            if let Some(n) = &node {
                load::require_node(&plan, n)?;
            }
            match (output, &node) {
                (Output::Table, _) => print!("{}", table::render(&plan, node.as_deref())),
                (_, Some(n)) => output::print(output, plan.node(n).expect("checked"))?,
                (_, None) => output::print(output, &plan)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Graph {
            file,
            format,
            live,
            sample,
            accept_new_host_keys,
            state,
        } => {
            let cluster = load::cluster(&file)?;
            let state = load::state(&file, state.as_deref())?;
            let picture = skybridge_core::graph::Graph::of(&cluster, &plan(&cluster, &state));
            let live = if live {
                let (before, after, seconds) = cost::sample(
                    &cluster,
                    &file,
                    std::time::Duration::from_secs(sample.max(1)),
                    false,
                    accept_new_host_keys,
                )?;
                Some(graph::live(&cluster, &before, &after, seconds))
            } else {
                None
            };
            print!("{}", graph::draw(picture, live.as_ref(), format));
            Ok(ExitCode::SUCCESS)
        }
        Command::Cost {
            file,
            live,
            sample,
            accept_new_host_keys,
            output,
        } => {
            let cluster = load::cluster(&file)?;
            let traffic = if live {
                cost::measure(
                    &cluster,
                    &file,
                    std::time::Duration::from_secs(sample.max(1)),
                    accept_new_host_keys,
                )?
            } else {
                Vec::new()
            };
            let report = skybridge_core::cost::report(&cluster, &traffic);
            match output {
                Output::Table => print!("{}", report.table()),
                _ => output::print(output, &report)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Render {
            file,
            format,
            dir,
            out,
            node,
            generate_keys,
            state,
        } => {
            let dir = match (dir, out) {
                (Some(dir), _) => dir,
                (None, Some(out)) => {
                    if !load::quiet() {
                        eprintln!(
                            "warning: render --out is now --dir (--output is a report format in every other command); --out will go away"
                        );
                    }
                    out
                }
                (None, None) => unreachable!("clap requires --dir unless --out is given"),
            };
            let cluster = load::cluster(&file)?;
            let mut state = load::state(&file, state.as_deref())?;
            let private = if generate_keys {
                if !matches!(
                    format,
                    RenderFormat::Wireguard | RenderFormat::Networkd | RenderFormat::Script
                ) {
                    return Err(load::Invalid::new(
                        "--generate-keys applies to the wireguard, networkd and script formats",
                    )
                    .into());
                }
                let (private, public) = keys::generate_for(&cluster);
                state = State {
                    public_keys: public,
                };
                Some(private)
            } else {
                None
            };
            let plan = plan(&cluster, &state);
            if let Some(n) = &node {
                load::require_node(&plan, n)?;
            }
            let files = skybridge_render::render(&plan, format.into(), private.as_ref())
                .map_err(|e| load::Invalid::new(e.to_string()))?;
            let written = write_files(&dir, format.into(), &files, node.as_deref())?;
            if !load::quiet() {
                println!("wrote {written} file(s) under {}", dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `skybridge validate`: the diagnostics for reading, or as one document.
fn validate(file: &Path, output: Output) -> Result<ExitCode> {
    if output == Output::Table {
        let cluster = load::cluster(file)?;
        let nodes = cluster.nodes().count();
        println!(
            "{}: valid: cluster {}, {} site(s), {nodes} node(s), transport {}",
            file.display(),
            cluster.name,
            cluster.sites.len(),
            cluster.network.transport.as_str()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (_, result) = load::read(file)?;
    let report = output::ValidateReport::new(file, &result);
    output::print(output, &report)?;
    Ok(if report.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::INVALID_INPUT)
    })
}

/// Writes the rendered files under `dir`, refusing a folder that holds
/// anything but an earlier render of the same format: mixing formats would
/// leave a node's folder with two configurations of the same tunnel.
fn write_files(
    dir: &Path,
    format: Format,
    files: &[skybridge_render::File],
    node: Option<&str>,
) -> Result<usize> {
    use atomic_write_file::unix::OpenOptionsExt as _;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    use std::os::unix::fs::PermissionsExt as _;
    let mut entries = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(list) => {
            for e in list {
                let e = e.with_context(|| format!("listing {}", dir.display()))?;
                entries.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    }
    let mark_path = dir.join(skybridge_render::folder::MARK);
    let mark = match std::fs::read_to_string(&mark_path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", mark_path.display())),
    };
    skybridge_render::folder::check(&entries, mark.as_deref(), format)
        .map_err(|e| load::Invalid::new(format!("{}: {e}", dir.display())))?;
    let mark = skybridge_render::folder::mark(format);
    let mut n = 0;
    for f in files.iter().chain(std::iter::once(&mark)) {
        if let Some(node) = node
            && !f.path.starts_with(&format!("{node}/"))
            && f.path != mark.path
        {
            continue;
        }
        let path = dir.join(&f.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let write = || -> std::io::Result<()> {
            let mut options = atomic_write_file::OpenOptions::new();
            // The temporary file gets the final mode from the start, so a
            // private key is never readable by others, not even briefly.
            options.preserve_mode(false).mode(f.mode);
            let mut file = options.open(&path)?;
            file.as_file()
                .set_permissions(std::fs::Permissions::from_mode(f.mode))?;
            file.write_all(f.contents.as_bytes())?;
            file.commit()
        };
        write().with_context(|| format!("writing {}", path.display()))?;
        if f.path != mark.path {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_starter_file_is_valid_without_warnings_and_uses_documentation_addresses() {
        let v = skybridge_core::load(STARTER).unwrap_or_else(|d| panic!("{d:?}"));
        assert!(v.warnings.is_empty(), "{:?}", v.warnings);
        for (_, node) in v.cluster.nodes() {
            if let Some(p) = node.public {
                let o = p.ip.octets();
                assert!(
                    matches!(o, [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _]),
                    "{}",
                    p.ip
                );
            }
        }
    }

    /// Every subcommand, argument and option a user can see, with where it is.
    fn blank_help(cmd: &clap::Command, path: &str, blanks: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if arg.is_hide_set() || matches!(id, "help" | "version") {
                continue;
            }
            let help = arg
                .get_help()
                .or(arg.get_long_help())
                .map(ToString::to_string);
            if help.is_none_or(|h| h.trim().is_empty()) {
                blanks.push(format!("{path} <{id}>"));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.is_hide_set() || sub.get_name() == "help" {
                continue;
            }
            let sub_path = format!("{path} {}", sub.get_name());
            let about = sub
                .get_about()
                .or(sub.get_long_about())
                .map(ToString::to_string);
            if about.is_none_or(|a| a.trim().is_empty()) {
                blanks.push(sub_path.clone());
            }
            blank_help(sub, &sub_path, blanks);
        }
    }

    #[test]
    fn every_subcommand_argument_and_option_has_a_help_line() {
        use clap::CommandFactory as _;
        let cmd = Cli::command();
        let mut blanks = Vec::new();
        blank_help(&cmd, "skybridge", &mut blanks);
        assert!(blanks.is_empty(), "no help line: {blanks:#?}");
        // The walker sees what it should: a nested subcommand's option.
        let lab = cmd.find_subcommand("lab").unwrap();
        assert!(lab.find_subcommand("check").is_some());
    }

    #[test]
    fn the_walker_finds_a_blank_help_line() {
        let cmd = clap::Command::new("t").subcommand(
            clap::Command::new("s")
                .about("has one")
                .arg(clap::Arg::new("file")),
        );
        let mut blanks = Vec::new();
        blank_help(&cmd, "t", &mut blanks);
        assert_eq!(blanks, ["t s <file>"]);
    }

    #[test]
    fn the_help_documents_exit_codes_and_logging() {
        use clap::CommandFactory as _;
        let help = Cli::command().render_long_help().to_string();
        for needle in ["Exit codes:", "SKYBRIDGE_LOG", "--verbose", "--quiet"] {
            assert!(help.contains(needle), "{needle}: {help}");
        }
        for (code, value) in [
            ("  1  runtime failure", exit::RUNTIME),
            ("  2  invalid input", exit::INVALID_INPUT),
            ("  3  some nodes failed", exit::NODES_FAILED),
        ] {
            assert!(help.contains(code), "{code}");
            assert_eq!(code.trim_start().as_bytes()[0], b'0' + value);
        }
    }

    #[test]
    fn every_shell_gets_a_completion_script_naming_the_subcommands() {
        use clap::CommandFactory as _;
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "skybridge", &mut out);
            let text = String::from_utf8(out).unwrap();
            for sub in ["apply", "graph", "lab", "validate"] {
                assert!(text.contains(sub), "{shell}: {sub}");
            }
        }
    }

    #[test]
    fn every_visible_command_gets_a_manual_page_and_hidden_ones_none() {
        use clap::CommandFactory as _;
        let pages = man::pages(Cli::command()).unwrap();
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "skybridge.1",
            "skybridge-apply.1",
            "skybridge-lab.1",
            "skybridge-lab-up.1",
            "skybridge-agent.1",
            "skybridge-man.1",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(
            !names
                .iter()
                .any(|n| n.contains("dataplane") || n.contains("help")),
            "{names:?}"
        );
        for (name, text) in &pages {
            let text = String::from_utf8(text.clone()).unwrap();
            assert!(text.contains(".TH "), "{name}");
            assert!(text.contains(".SH NAME"), "{name}");
        }
        let apply = &pages
            .iter()
            .find(|(n, _)| n == "skybridge-apply.1")
            .unwrap()
            .1;
        let apply = String::from_utf8_lossy(apply);
        assert!(apply.contains("ARCH=PATH"), "{apply}");
    }
}
