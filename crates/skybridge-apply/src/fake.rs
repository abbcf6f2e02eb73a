//! A recording [`Connector`] for unit tests: nodes are scripted, every
//! command is recorded, nothing leaves the process.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use crate::apply::paths;
use crate::session::{Connector, Output, Session, SshError};
use crate::target::Target;

/// How a scripted node behaves.
#[derive(Debug, Clone, Default)]
pub struct FakeNode {
    /// Refuse every connection with this error.
    pub unreachable: Option<SshError>,
    /// `sha256sum` of the installed binary.
    pub installed_sha256: String,
    pub dry_run_changes: Vec<String>,
    /// After `agent try`, no new connection gets through (the change cut it).
    pub try_cuts_ssh: bool,
    /// `agent try` breaks the session it runs on, but succeeds, and new
    /// connections get through: the designed success path.
    pub try_drops_its_session: bool,
    /// `agent try` fails after changing the node and restores it, with this reason.
    pub try_fails: Option<String>,
    pub agent_running: bool,
    /// The node has made no WireGuard key yet: `agent pubkey` makes one.
    pub no_key: bool,
    /// What `down`'s listing finds of Skybridge, until its removal runs.
    pub skybridge_files: Vec<String>,
    /// `agent down` fails with this on stderr.
    pub down_fails: Option<String>,
    /// What `uname -m` prints [default: this machine's architecture].
    pub arch: Option<String>,
    /// The id of an `agent try` pending on the node.
    pub pending_try: Option<String>,
}

#[derive(Debug, Default)]
struct World {
    nodes: BTreeMap<String, FakeNode>,
    cut: BTreeSet<String>,
    /// How each node's try stands: "applied", "confirmed", "rolled-back".
    tries: BTreeMap<String, &'static str>,
    files: BTreeMap<(String, String), Vec<u8>>,
    log: Vec<(String, String)>,
    in_flight: usize,
    max_in_flight: usize,
}

/// Shared by the connector and its sessions.
#[derive(Debug, Clone, Default)]
pub struct FakeConnector {
    world: Rc<RefCell<World>>,
    /// Each command takes this long (to observe parallelism).
    pub latency: Duration,
}

impl FakeConnector {
    pub fn node(&self, name: &str, node: FakeNode) {
        self.world.borrow_mut().nodes.insert(name.to_owned(), node);
    }

    /// Every command run on `node`, in order.
    pub fn commands(&self, node: &str) -> Vec<String> {
        let w = self.world.borrow();
        w.log
            .iter()
            .filter(|(n, _)| n == node)
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// Puts a file on `node` as if it were there before.
    pub fn put_file(&self, node: &str, path: &str, data: &[u8]) {
        let mut w = self.world.borrow_mut();
        w.files
            .insert((node.to_owned(), path.to_owned()), data.to_vec());
    }

    pub fn file(&self, node: &str, path: &str) -> Option<Vec<u8>> {
        let w = self.world.borrow();
        w.files.get(&(node.to_owned(), path.to_owned())).cloned()
    }

    /// The most commands that ran at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.world.borrow().max_in_flight
    }
}

#[derive(Debug)]
pub struct FakeSession {
    target: Target,
    conn: FakeConnector,
}

impl Connector for FakeConnector {
    type Session = FakeSession;
    async fn connect(&self, target: &Target) -> Result<FakeSession, SshError> {
        let w = self.world.borrow();
        let node = w.nodes.get(&target.node).cloned().unwrap_or_default();
        if let Some(e) = node.unreachable {
            return Err(e);
        }
        if w.cut.contains(&target.node) {
            return Err(SshError::Connect {
                target: target.to_string(),
                message: "Connection timed out".into(),
            });
        }
        Ok(FakeSession {
            target: target.clone(),
            conn: self.clone(),
        })
    }
}

/// A syntactically valid WireGuard key, different per node.
pub fn key_of(node: &str) -> String {
    let mut k: String = node.chars().filter(char::is_ascii_alphanumeric).collect();
    k.truncate(40);
    format!("{k:A<43}=")
}

impl Session for FakeSession {
    async fn run(&self, command: &str, stdin: Option<&[u8]>) -> Result<Output, SshError> {
        let name = self.target.node.clone();
        {
            let mut w = self.conn.world.borrow_mut();
            w.log.push((name.clone(), command.to_owned()));
            w.in_flight += 1;
            w.max_in_flight = w.max_in_flight.max(w.in_flight);
        }
        tokio::time::sleep(self.conn.latency).await;
        let mut w = self.conn.world.borrow_mut();
        w.in_flight -= 1;
        let node = w.nodes.get(&name).cloned().unwrap_or_default();
        let ok = |stdout: String| Output {
            code: Some(0),
            stdout,
            stderr: String::new(),
        };
        let out = if command.starts_with("for m in ") {
            ok(node
                .pending_try
                .as_ref()
                .map(|id| format!("{id}\n"))
                .unwrap_or_default())
        } else if command.starts_with("for p in ") {
            ok(node
                .skybridge_files
                .iter()
                .map(|f| format!("{f}\n"))
                .collect())
        } else if command.contains(" agent down") && !command.contains("--dry-run") {
            match &node.down_fails {
                Some(why) => Output {
                    code: Some(1),
                    stdout: String::new(),
                    stderr: why.clone(),
                },
                None => ok(format!("{name}: applying 1 change(s):\n  - link sb-wg0\n")),
            }
        } else if command.contains(" agent down --dry-run") {
            ok(format!(
                "{name}: would apply 1 change(s):\n  - link sb-wg0\n"
            ))
        } else if command.contains("systemctl disable --now") {
            if let Some(n) = w.nodes.get_mut(&name) {
                n.skybridge_files.clear();
            }
            ok(String::new())
        } else if command.starts_with("uname -m") {
            ok(format!(
                "{}\n{}  {}\n",
                node.arch.as_deref().unwrap_or(std::env::consts::ARCH),
                node.installed_sha256,
                paths::BINARY
            ))
        } else if command.contains("agent --dry-run --output json") {
            dry_run_report(&name, &node)
        } else if let Some(data) = stdin {
            let path = command
                .rsplit("mv -f ")
                .next()
                .and_then(|r| r.split_whitespace().nth(1))
                .unwrap_or_default()
                .trim_matches('\'')
                .to_owned();
            w.files.insert((name.clone(), path), data.to_vec());
            ok(String::new())
        } else if command.ends_with("agent pubkey --no-generate") && node.no_key {
            Output {
                code: Some(3),
                ..Output::default()
            }
        } else if command.ends_with("agent pubkey") || command.ends_with("--no-generate") {
            if let Some(n) = w.nodes.get_mut(&name)
                && command.ends_with("agent pubkey")
            {
                n.no_key = false;
            }
            ok(key_of(&name) + "\n")
        } else if command.contains("agent try --output json") {
            if node.try_cuts_ssh {
                w.cut.insert(name.clone());
            }
            let report = match &node.try_fails {
                Some(reason) => {
                    w.tries.insert(name.clone(), "rolled-back");
                    serde_json::json!({ "outcome": "rolled-back", "reason": reason })
                }
                None => {
                    w.tries.insert(name.clone(), "applied");
                    serde_json::json!({ "outcome": "applied", "confirm_timeout": 3 })
                }
            };
            if node.try_drops_its_session {
                return Err(SshError::Broken {
                    target: name,
                    doing: "running agent try".into(),
                    message: "Connection reset by peer".into(),
                });
            }
            ok(report.to_string() + "\n")
        } else if command.contains("agent confirm --output json") {
            let outcome = match w.tries.get(&name).copied() {
                Some("applied") => {
                    w.tries.insert(name.clone(), "confirmed");
                    serde_json::json!({ "outcome": "confirmed" })
                }
                Some("confirmed") => serde_json::json!({ "outcome": "already-confirmed" }),
                Some(_) => serde_json::json!({ "outcome": "rolled-back", "reason": "restored" }),
                None => serde_json::json!({ "outcome": "unknown" }),
            };
            ok(outcome.to_string())
        } else if command.contains("systemctl is-active") {
            Output {
                code: Some(if node.agent_running { 0 } else { 1 }),
                ..Output::default()
            }
        } else if command.contains("ping") {
            // Every node answers: print the names the script asks about.
            ok(command
                .lines()
                .filter_map(|l| l.split("&& echo ").nth(1))
                .map(|r| r.trim_end_matches(" &").trim_matches('\'').to_owned() + "\n")
                .collect())
        } else if let Some(rest) = command.strip_prefix("if [ -e ") {
            let path = rest
                .split(" ]")
                .next()
                .unwrap_or_default()
                .trim_matches('\'');
            match w.files.get(&(name.clone(), path.to_owned())) {
                Some(data) => ok(String::from_utf8_lossy(data).into_owned()),
                None => Output {
                    code: Some(3),
                    ..Output::default()
                },
            }
        } else {
            ok(String::new())
        };
        Ok(out)
    }

    fn target(&self) -> &Target {
        &self.target
    }
}

/// What the agent's dry run writes: the core's report type, one definition.
fn dry_run_report(name: &str, node: &FakeNode) -> Output {
    let report = skybridge_core::report::RunReport {
        node: name.to_owned(),
        dry_run: true,
        changes: node
            .dry_run_changes
            .iter()
            .map(|c| skybridge_core::report::ChangeEntry {
                change: skybridge_core::diff::Change {
                    op: skybridge_core::diff::Op::SetUp {
                        link: "sb-wg0".into(),
                    },
                    reason: "r".into(),
                },
                summary: c.clone(),
            })
            .collect(),
        refused: vec![],
        failed: vec![],
        applied: 0,
    };
    Output {
        code: Some(0),
        stdout: serde_json::to_string(&report).unwrap_or_default(),
        stderr: String::new(),
    }
}
