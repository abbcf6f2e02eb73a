//! `skybridge`: the command line. Thin by design: it reads files, calls the
//! pure core (validate, plan) and the renderers, prints, and writes files.

mod agent;
mod apply;
mod join;
mod keys;
mod lab;
mod load;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use skybridge_core::{State, plan, table};
use skybridge_render::Format;

#[derive(Debug, Parser)]
#[command(
    name = "skybridge",
    version,
    about = "One Kubernetes cluster across VMs of several cloud providers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    /// The whole multi-provider topology on this machine, in network namespaces.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// The userspace WireGuard data plane of one interface (started by the agent).
    #[command(hide = true)]
    WireguardDataplane {
        /// Interface name, e.g. sb-wg0.
        iface: String,
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
    },
    /// Show what every node will get: tunnels, peers, routes, sysctls, firewall rules.
    Plan {
        file: PathBuf,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
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
        #[arg(long, value_enum, default_value_t = GraphFormat::Svg)]
        format: GraphFormat,
        /// Public keys collected from the nodes [default: <file>.state.yaml beside the cluster file].
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// What the cluster costs per site and month (from the sites' `costs` and
    /// the nodes' `vcpus`/`memoryGiB`), and where its workers would be cheaper.
    Cost {
        /// The cluster file (YAML).
        file: PathBuf,
        /// table: for reading; json: for scripts.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Write per-node artifacts for applying the plan by hand.
    Render {
        file: PathBuf,
        #[arg(long, value_enum)]
        format: RenderFormat,
        /// Output folder; one sub-folder per node.
        #[arg(long)]
        out: PathBuf,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
        /// WireGuard: generate every node's key pair into the output folder (mode 0600)
        /// instead of leaving a placeholder for the node's own key.
        #[arg(long)]
        generate_keys: bool,
        #[arg(long)]
        state: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum GraphFormat {
    Svg,
    Dot,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RenderFormat {
    Script,
    Networkd,
    Nftables,
    Wireguard,
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
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Agent(args) => agent::main(args),
        Command::Join(args) => join::main(args),
        Command::Apply(args) => apply::main(args),
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
        Command::Validate { file } => {
            let Some(cluster) = load::cluster(&file)? else {
                return Ok(ExitCode::FAILURE);
            };
            let nodes = cluster.nodes().count();
            println!(
                "{}: valid: cluster {}, {} site(s), {nodes} node(s), transport {}",
                file.display(),
                cluster.name,
                cluster.sites.len(),
                cluster.network.transport.as_str()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan {
            file,
            node,
            output,
            state,
        } => {
            let Some(cluster) = load::cluster(&file)? else {
                return Ok(ExitCode::FAILURE);
            };
            let state = load::state(&file, state.as_deref())?;
            let plan = plan(&cluster, &state);
            if let Some(n) = &node {
                load::require_node(&plan, n)?;
            }
            match output {
                Output::Table => print!("{}", table::render(&plan, node.as_deref())),
                Output::Json => {
                    let json = match &node {
                        Some(n) => serde_json::to_string_pretty(plan.node(n).expect("checked")),
                        None => serde_json::to_string_pretty(&plan),
                    }?;
                    println!("{json}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Graph {
            file,
            format,
            state,
        } => {
            let Some(cluster) = load::cluster(&file)? else {
                return Ok(ExitCode::FAILURE);
            };
            let state = load::state(&file, state.as_deref())?;
            let graph = skybridge_core::graph::Graph::of(&cluster, &plan(&cluster, &state));
            print!(
                "{}",
                match format {
                    GraphFormat::Svg => graph.to_svg(),
                    GraphFormat::Dot => graph.to_dot(),
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Cost { file, output } => {
            let Some(cluster) = load::cluster(&file)? else {
                return Ok(ExitCode::FAILURE);
            };
            let report = skybridge_core::cost::report(&cluster, &[]);
            match output {
                Output::Table => print!("{}", report.table()),
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Render {
            file,
            format,
            out,
            node,
            generate_keys,
            state,
        } => {
            let Some(cluster) = load::cluster(&file)? else {
                return Ok(ExitCode::FAILURE);
            };
            let mut state = load::state(&file, state.as_deref())?;
            let private = if generate_keys {
                if !matches!(
                    format,
                    RenderFormat::Wireguard | RenderFormat::Networkd | RenderFormat::Script
                ) {
                    bail!("--generate-keys applies to the wireguard, networkd and script formats");
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
            let files = skybridge_render::render(&plan, format.into(), private.as_ref())?;
            let written = write_files(&out, &files, node.as_deref())?;
            println!("wrote {written} file(s) under {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn write_files(out: &Path, files: &[skybridge_render::File], node: Option<&str>) -> Result<usize> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    use std::os::unix::fs::PermissionsExt as _;
    let mut n = 0;
    for f in files {
        if let Some(node) = node
            && !f.path.starts_with(&format!("{node}/"))
        {
            continue;
        }
        let path = out.join(&f.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // Create with the final mode so a private key is never readable by others, not even briefly.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(f.mode)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        file.set_permissions(std::fs::Permissions::from_mode(f.mode))?;
        file.write_all(f.contents.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        n += 1;
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
}
