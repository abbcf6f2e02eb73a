//! containerd's config.toml, edited in place: the sandbox image, the runc
//! runtime's `SystemdCgroup` and the registry mirrors, and nothing else.
//!
//! The operator's file is parsed with `toml_edit`, which keeps comments,
//! key order, formatting and every setting Skybridge does not manage; only
//! the managed keys are set. Which keys those are depends on the config
//! schema (version 2 for containerd 1.x, version 3 for containerd 2.x) and on
//! whether the installed containerd reads registry hosts from a directory
//! (`config_path` + `hosts.toml`, containerd ≥ 1.5) or only knows the legacy
//! `registry.mirrors` table.

use std::fmt;
use std::str::FromStr;

use skybridge_core::model::Containerd;
use toml_edit::{Array, DocumentMut, Item, Table, TableLike, Value};

/// Where containerd reads its configuration.
pub const CONFIG_PATH: &str = "/etc/containerd/config.toml";
/// Where Skybridge puts `hosts.toml` files when the config names no directory.
pub const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";
/// containerd's runc shim, the `runtime_type` of its built-in runc runtime.
pub const RUNC_RUNTIME_TYPE: &str = "io.containerd.runc.v2";
/// First line of every file Skybridge writes in full.
pub const MANAGED_HEADER: &str = skybridge_core::layout::marks::JOIN_HEADER;

/// `containerd --version`'s version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    /// Reads `containerd --version` output, e.g.
    /// `containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3`
    /// or `containerd containerd.io v2.0.4 1a43cb6a`.
    pub fn from_version_output(out: &str) -> Option<Version> {
        out.split_whitespace()
            .skip(1)
            .find_map(|w| w.strip_prefix('v').unwrap_or(w).parse().ok())
    }

    /// containerd 1.5 introduced `registry.config_path` and hosts.toml.
    pub fn has_config_path(self) -> bool {
        (self.major, self.minor) >= (1, 5)
    }
}

impl FromStr for Version {
    type Err = ();

    /// `1.6.20`, `1.6.20~ds1`, `2.0.0-rc.1`: the leading three numbers.
    fn from_str(s: &str) -> Result<Self, ()> {
        let mut it = s.splitn(3, '.');
        let major = it.next().ok_or(())?.parse().map_err(|_| ())?;
        let minor = it.next().ok_or(())?.parse().map_err(|_| ())?;
        let rest = it.next().ok_or(())?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let patch = digits.parse().map_err(|_| ())?;
        Ok(Version {
            major,
            minor,
            patch,
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The config file's schema: its `version` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schema {
    /// containerd 1.x (`plugins."io.containerd.grpc.v1.cri"`).
    V2,
    /// containerd 2.x (`plugins."io.containerd.cri.v1.images"` / `"io.containerd.cri.v1.runtime"`).
    V3,
}

/// How the registry mirrors reach containerd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Registry {
    /// `registry.config_path` names this directory; one `hosts.toml` per registry in it.
    HostsDir(String),
    /// The legacy `registry.mirrors."<registry>".endpoint` lists (containerd < 1.5).
    LegacyMirrors,
}

/// A managed file of the hosts directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostsFile {
    pub path: String,
    pub contents: String,
}

/// The result of editing config.toml.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edited {
    pub config: String,
    pub schema: Schema,
    pub registry: Registry,
    pub hosts: Vec<HostsFile>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{CONFIG_PATH} is not valid TOML: {0}")]
    Parse(String),
    #[error(
        "{CONFIG_PATH} has config version {0}, which skybridge join does not edit; convert it with `containerd config migrate` (containerd 2.x) or rewrite it as version = 2 (`containerd config default` shows the layout)"
    )]
    UnsupportedVersion(i64),
    #[error(
        "{CONFIG_PATH}: {0} is not a table; skybridge join needs to set keys under it — fix or remove that entry"
    )]
    NotATable(String),
    #[error(
        "{CONFIG_PATH} lists registry mirrors in the legacy table {0}, which containerd {1} refuses together with config_path; move them to spec.kubernetes.containerd.registryMirrors in the cluster file and delete the table"
    )]
    LegacyMirrorsPresent(String, Version),
}

/// Applies `want` to the current config.toml (`None` when there is none yet).
///
/// `version` is the installed containerd's; without it the schema comes
/// from the file (or version 2 for a new one) and hosts.toml is assumed to
/// be supported (every containerd since 1.5, 2021).
///
/// # Errors
/// A file that is not TOML, of a schema other than 2 or 3, whose managed
/// keys sit where a table is expected, or with legacy mirrors that
/// containerd would refuse next to `config_path`. Nothing is changed then.
pub fn edit(
    current: Option<&str>,
    want: &Containerd,
    version: Option<Version>,
    header: &str,
) -> Result<Edited, ConfigError> {
    let text = current.unwrap_or("");
    let indented = text.lines().any(|l| l.starts_with("  ["));
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| ConfigError::Parse(e.to_string().trim().to_owned()))?;
    let by_version = match version {
        Some(v) if v.major >= 2 => Schema::V3,
        _ => Schema::V2,
    };
    let schema = match doc.get("version").and_then(Item::as_integer) {
        Some(2) => Schema::V2,
        Some(3) => Schema::V3,
        Some(other) => return Err(ConfigError::UnsupportedVersion(other)),
        // No version key: a file with settings is a version 1 file; an empty one is new.
        None if doc.as_table().is_empty() => {
            let v = match by_version {
                Schema::V2 => 2,
                Schema::V3 => 3,
            };
            let mut item = toml_edit::value(v);
            if current.is_none() {
                if let Some(value) = item.as_value_mut() {
                    value.decor_mut().set_suffix("");
                }
                doc.decor_mut().set_prefix(format!("{header}\n"));
            }
            doc.insert("version", item);
            by_version
        }
        None => return Err(ConfigError::UnsupportedVersion(1)),
    };

    let (cri_images, cri_runtime) = match schema {
        Schema::V2 => (
            vec!["plugins", "io.containerd.grpc.v1.cri"],
            vec!["plugins", "io.containerd.grpc.v1.cri"],
        ),
        Schema::V3 => (
            vec!["plugins", "io.containerd.cri.v1.images"],
            vec!["plugins", "io.containerd.cri.v1.runtime"],
        ),
    };

    // Sandbox image.
    match schema {
        Schema::V2 => set(
            &mut doc,
            &cri_images,
            "sandbox_image",
            want.sandbox_image.as_str().into(),
            indented,
        )?,
        Schema::V3 => {
            let mut path = cri_images.clone();
            path.push("pinned_images");
            set(
                &mut doc,
                &path,
                "sandbox",
                want.sandbox_image.as_str().into(),
                indented,
            )?;
        }
    }

    // SystemdCgroup on the runtime CRI uses by default (runc unless the operator chose another).
    let mut containerd_path = cri_runtime.clone();
    containerd_path.push("containerd");
    let runtime = get(&doc, &containerd_path)
        .and_then(|t| t.get("default_runtime_name"))
        .and_then(Item::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("runc")
        .to_owned();
    let mut runtime_path = containerd_path.clone();
    runtime_path.extend(["runtimes", runtime.as_str()]);
    // A runtimes.runc table that the file creates replaces containerd's
    // built-in one as a whole: without runtime_type the CRI plugin would
    // run runc with an empty type (seen in the real daemon's start log).
    let has_type = get(&doc, &runtime_path)
        .and_then(|t| t.get("runtime_type"))
        .is_some();
    if runtime == "runc" && !has_type {
        set(
            &mut doc,
            &runtime_path,
            "runtime_type",
            RUNC_RUNTIME_TYPE.into(),
            indented,
        )?;
    }
    let mut options = runtime_path.clone();
    options.push("options");
    set(
        &mut doc,
        &options,
        "SystemdCgroup",
        want.systemd_cgroup.into(),
        indented,
    )?;

    // Registry mirrors.
    let mut registry_path = cri_images.clone();
    registry_path.push("registry");
    let legacy = schema == Schema::V2 && version.is_some_and(|v| !v.has_config_path());
    let mut hosts = Vec::new();
    let registry = if legacy {
        let mut mirrors = registry_path.clone();
        mirrors.push("mirrors");
        for (reg, endpoints) in &want.registry_mirrors {
            let (name, mut list) = if reg == "_default" {
                ("*".to_owned(), endpoints.clone())
            } else {
                let mut l = endpoints.clone();
                l.push(upstream(reg));
                (reg.clone(), l)
            };
            list.dedup();
            let mut path = mirrors.clone();
            path.push(&name);
            set(
                &mut doc,
                &path,
                "endpoint",
                Value::Array(list.iter().collect::<Array>()),
                indented,
            )?;
        }
        Registry::LegacyMirrors
    } else {
        let existing = get(&doc, &registry_path)
            .and_then(|t| t.get("config_path"))
            .and_then(Item::as_str)
            .and_then(|s| s.split(':').next())
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        let dir = existing
            .clone()
            .unwrap_or_else(|| DEFAULT_HOSTS_DIR.to_owned());
        if !want.registry_mirrors.is_empty() {
            let mirrors = get(&doc, &registry_path)
                .and_then(|t| t.get("mirrors"))
                .and_then(Item::as_table_like)
                .is_some_and(|t| !t.is_empty());
            if mirrors {
                let mut p = registry_path.clone();
                p.push("mirrors");
                return Err(ConfigError::LegacyMirrorsPresent(
                    dotted(&p),
                    version.unwrap_or(Version {
                        major: 1,
                        minor: 5,
                        patch: 0,
                    }),
                ));
            }
            if existing.is_none() {
                set(
                    &mut doc,
                    &registry_path,
                    "config_path",
                    dir.as_str().into(),
                    indented,
                )?;
            }
            for (reg, endpoints) in &want.registry_mirrors {
                hosts.push(HostsFile {
                    path: format!("{dir}/{reg}/hosts.toml"),
                    contents: hosts_toml(reg, endpoints, header),
                });
            }
        }
        Registry::HostsDir(dir)
    };

    Ok(Edited {
        config: doc.to_string(),
        schema,
        registry,
        hosts,
    })
}

/// containerd's hosts.toml for one registry: the mirrors in order, then the
/// registry itself (containerd falls back to `server`).
pub fn hosts_toml(registry: &str, endpoints: &[String], header: &str) -> String {
    let mut doc = DocumentMut::new();
    doc.decor_mut().set_prefix(format!(
        "{header}: mirrors of {registry}, tried in order before the registry itself.\n"
    ));
    if registry != "_default" {
        doc.insert("server", toml_edit::value(upstream(registry)));
    }
    let mut host = Table::new();
    host.set_implicit(true);
    for e in endpoints {
        let mut t = Table::new();
        let caps: Array = ["pull", "resolve"].into_iter().collect();
        t.insert("capabilities", toml_edit::value(caps));
        host.insert(e, Item::Table(t));
    }
    doc.insert("host", Item::Table(host));
    doc.to_string()
}

/// The address containerd pulls from when no mirror answers.
fn upstream(registry: &str) -> String {
    match registry {
        "docker.io" => "https://registry-1.docker.io".to_owned(),
        r => format!("https://{r}"),
    }
}

/// Checks containerd's effective configuration (`containerd config dump`)
/// against what join wrote. Returns what does not match, empty when all does.
pub fn verify_dump(dump: &str, want: &Containerd, registry: &Registry) -> Vec<String> {
    let doc: DocumentMut = match dump.parse() {
        Ok(d) => d,
        Err(e) => return vec![format!("containerd config dump is not TOML: {e}")],
    };
    let v3 = doc.get("version").and_then(Item::as_integer) == Some(3);
    let (images, runtime): (&[&str], &[&str]) = if v3 {
        (
            &["plugins", "io.containerd.cri.v1.images"],
            &["plugins", "io.containerd.cri.v1.runtime"],
        )
    } else {
        (
            &["plugins", "io.containerd.grpc.v1.cri"],
            &["plugins", "io.containerd.grpc.v1.cri"],
        )
    };
    let mut problems = Vec::new();
    let mut check = |path: Vec<&str>, key: &str, expect: String| {
        let got = get(&doc, &path)
            .and_then(|t| t.get(key))
            .and_then(Item::as_value)
            .map(|v| match v {
                Value::String(s) => s.value().clone(),
                other => other.to_string().trim().to_owned(),
            });
        if got.as_deref() != Some(expect.as_str()) {
            problems.push(format!(
                "{}.{key} is {} instead of {expect}",
                dotted(&path),
                got.as_deref().unwrap_or("unset")
            ));
        }
    };
    let mut sandbox = images.to_vec();
    let sandbox_key = if v3 {
        sandbox.push("pinned_images");
        "sandbox"
    } else {
        "sandbox_image"
    };
    check(sandbox, sandbox_key, want.sandbox_image.clone());
    let mut containerd = runtime.to_vec();
    containerd.push("containerd");
    let default_runtime = get(&doc, &containerd)
        .and_then(|t| t.get("default_runtime_name"))
        .and_then(Item::as_str)
        .unwrap_or("runc")
        .to_owned();
    let mut runtime_path = containerd.clone();
    runtime_path.extend(["runtimes", default_runtime.as_str()]);
    let runtime_type = get(&doc, &runtime_path)
        .and_then(|t| t.get("runtime_type"))
        .and_then(Item::as_str)
        .unwrap_or("");
    let type_problem = runtime_type.is_empty().then(|| {
        format!(
            "{}.runtime_type is empty: CRI would not know how to run containers",
            dotted(&runtime_path)
        )
    });
    let mut options = runtime_path.clone();
    options.push("options");
    check(options, "SystemdCgroup", want.systemd_cgroup.to_string());
    problems.extend(type_problem);
    let mut registry_path = images.to_vec();
    registry_path.push("registry");
    match registry {
        Registry::HostsDir(dir) if !want.registry_mirrors.is_empty() => {
            let got = get(&doc, &registry_path)
                .and_then(|t| t.get("config_path"))
                .and_then(Item::as_str)
                .unwrap_or("");
            if !got.split(':').any(|d| d == dir) {
                problems.push(format!(
                    "{}.config_path is '{got}', which does not name {dir}",
                    dotted(&registry_path)
                ));
            }
        }
        Registry::HostsDir(_) => {}
        Registry::LegacyMirrors => {
            for (reg, endpoints) in &want.registry_mirrors {
                let name = if reg == "_default" { "*" } else { reg.as_str() };
                let mut path = registry_path.clone();
                path.extend(["mirrors", name]);
                let got: Vec<String> = get(&doc, &path)
                    .and_then(|t| t.get("endpoint"))
                    .and_then(Item::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                if !got.starts_with(endpoints) {
                    problems.push(format!(
                        "{}.endpoint is {got:?}, which does not start with {endpoints:?}",
                        dotted(&path)
                    ));
                }
            }
        }
    }
    problems
}

fn dotted(path: &[&str]) -> String {
    path.iter()
        .map(|k| {
            if k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                (*k).to_owned()
            } else {
                format!("\"{k}\"")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn get<'a>(doc: &'a DocumentMut, path: &[&str]) -> Option<&'a dyn TableLike> {
    let mut cur: &dyn TableLike = doc.as_table();
    for k in path {
        cur = cur.get(k)?.as_table_like()?;
    }
    Some(cur)
}

/// Sets `key` in the table at `path`, creating missing tables as implicit
/// (no empty headers), and keeping the comments around an existing value.
/// In an indented file (containerd's own layout: two spaces per table
/// level), what is added is indented the same way.
fn set(
    doc: &mut DocumentMut,
    path: &[&str],
    key: &str,
    value: Value,
    indented: bool,
) -> Result<(), ConfigError> {
    let mut cur: &mut dyn TableLike = doc.as_table_mut();
    for (i, k) in path.iter().enumerate() {
        if cur.get(k).is_none() {
            let mut t = Table::new();
            t.set_implicit(true);
            if indented {
                t.decor_mut().set_prefix(format!("\n{}", "  ".repeat(i)));
            }
            cur.insert(k, Item::Table(t));
        }
        cur = cur
            .get_mut(k)
            .and_then(Item::as_table_like_mut)
            .ok_or_else(|| ConfigError::NotATable(dotted(&path[..=i])))?;
    }
    let mut value = value;
    match cur.get_mut(key) {
        Some(Item::Value(old)) => {
            if old.to_string().trim() == value.to_string().trim() {
                return Ok(());
            }
            *value.decor_mut() = old.decor().clone();
            *old = value;
        }
        Some(_) => {
            let mut p = path.to_vec();
            p.push(key);
            return Err(ConfigError::NotATable(format!(
                "{} (expected a value)",
                dotted(&p)
            )));
        }
        None => {
            // Indent like the table's other keys, or by depth.
            let sibling = cur
                .iter()
                .find(|(_, item)| item.is_value())
                .map(|(k, _)| k.to_owned())
                .and_then(|k| {
                    cur.get_key_value(&k)
                        .and_then(|(key, _)| key.leaf_decor().prefix())
                        .and_then(|p| p.as_str())
                        .map(str::to_owned)
                });
            let indent = sibling.unwrap_or_else(|| {
                if indented {
                    "  ".repeat(path.len())
                } else {
                    String::new()
                }
            });
            cur.insert(key, Item::Value(value));
            if let Some(mut k) = cur.key_mut(key) {
                k.leaf_decor_mut().set_prefix(indent);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const V1_6: Version = Version {
        major: 1,
        minor: 6,
        patch: 20,
    };

    fn want() -> Containerd {
        Containerd {
            sandbox_image: "registry.huawei.example/k8s/pause:3.9".into(),
            registry_mirrors: BTreeMap::from([(
                "docker.io".to_owned(),
                vec!["https://docker-mirror.huawei.example".to_owned()],
            )]),
            systemd_cgroup: true,
        }
    }

    #[test]
    fn versions_are_read_from_containerd_version_output() {
        let debian = "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3";
        assert_eq!(Version::from_version_output(debian), Some(V1_6));
        let upstream = "containerd containerd.io v2.0.4 1a43cb6a1035441f9aca8f5666a9b3ef9e70ab20";
        assert_eq!(
            Version::from_version_output(upstream).map(|v| v.to_string()),
            Some("2.0.4".into())
        );
        assert_eq!(Version::from_version_output("containerd"), None);
        assert!(V1_6.has_config_path());
        assert!(!"1.4.13".parse::<Version>().unwrap().has_config_path());
    }

    #[test]
    fn v2_edit_sets_the_three_settings_and_keeps_everything_else() {
        let src = r#"# Operator's notes: keep this comment.
version = 2
oom_score = -999

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "k8s.gcr.io/pause:3.2" # unreachable from here
    max_concurrent_downloads = 7
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
"#;
        let e = edit(Some(src), &want(), Some(V1_6), MANAGED_HEADER).unwrap();
        assert_eq!(e.schema, Schema::V2);
        assert_eq!(e.registry, Registry::HostsDir(DEFAULT_HOSTS_DIR.into()));
        assert!(
            e.config.starts_with(
                "# Operator's notes: keep this comment.\nversion = 2\noom_score = -999\n"
            ),
            "{}",
            e.config
        );
        assert!(
            e.config.contains(
                r#"sandbox_image = "registry.huawei.example/k8s/pause:3.9" # unreachable from here"#
            ),
            "{}",
            e.config
        );
        assert!(e.config.contains("max_concurrent_downloads = 7"));
        assert!(e.config.contains(r#"bin_dir = "/usr/lib/cni""#));
        assert!(e.config.contains("SystemdCgroup = true"), "{}", e.config);
        assert!(
            e.config
                .contains(r#"runtime_type = "io.containerd.runc.v2""#),
            "{}",
            e.config
        );
        assert!(
            e.config
                .contains(r#"config_path = "/etc/containerd/certs.d""#),
            "{}",
            e.config
        );
        assert_eq!(e.hosts.len(), 1);
        assert_eq!(
            e.hosts[0].path,
            "/etc/containerd/certs.d/docker.io/hosts.toml"
        );
        // Editing the result again changes nothing.
        let again = edit(Some(&e.config), &want(), Some(V1_6), MANAGED_HEADER).unwrap();
        assert_eq!(again.config, e.config);
    }

    #[test]
    fn v3_edit_uses_containerd_2_plugin_names() {
        let src = "version = 3\n\n[plugins.'io.containerd.cri.v1.runtime'.containerd]\n  default_runtime_name = 'crun'\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.crun]\n  runtime_type = 'io.containerd.runc.v2'\n  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.crun.options]\n    BinaryName = '/usr/bin/crun'\n";
        let v2 = Version {
            major: 2,
            minor: 0,
            patch: 4,
        };
        let e = edit(Some(src), &want(), Some(v2), MANAGED_HEADER).unwrap();
        assert_eq!(e.schema, Schema::V3);
        let doc: DocumentMut = e.config.parse().unwrap();
        let images = &doc["plugins"]["io.containerd.cri.v1.images"];
        assert_eq!(
            images["pinned_images"]["sandbox"].as_str(),
            Some("registry.huawei.example/k8s/pause:3.9")
        );
        assert_eq!(
            images["registry"]["config_path"].as_str(),
            Some(DEFAULT_HOSTS_DIR)
        );
        // The operator's default runtime gets the cgroup driver, not runc.
        let rt = &doc["plugins"]["io.containerd.cri.v1.runtime"]["containerd"];
        assert_eq!(
            rt["runtimes"]["crun"]["options"]["SystemdCgroup"].as_bool(),
            Some(true)
        );
        assert!(rt["runtimes"].get("runc").is_none());
        assert!(verify_dump(&e.config, &want(), &e.registry).is_empty());
    }

    #[test]
    fn a_new_file_gets_the_schema_of_the_installed_containerd() {
        let v2 = Version {
            major: 2,
            minor: 1,
            patch: 0,
        };
        let e = edit(None, &want(), Some(v2), MANAGED_HEADER).unwrap();
        assert!(
            e.config
                .starts_with("# Managed by skybridge join\nversion = 3\n"),
            "{}",
            e.config
        );
        let e = edit(None, &want(), Some(V1_6), MANAGED_HEADER).unwrap();
        assert!(e.config.contains("version = 2\n"), "{}", e.config);
        assert!(verify_dump(&e.config, &want(), &e.registry).is_empty());
    }

    #[test]
    fn old_containerd_gets_legacy_mirrors_with_the_registry_as_fallback() {
        let old = "1.4.13".parse().unwrap();
        let e = edit(Some("version = 2\n"), &want(), Some(old), MANAGED_HEADER).unwrap();
        assert_eq!(e.registry, Registry::LegacyMirrors);
        assert!(e.hosts.is_empty());
        let doc: DocumentMut = e.config.parse().unwrap();
        let ep = doc["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["mirrors"]["docker.io"]
            ["endpoint"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect::<Vec<_>>();
        assert_eq!(
            ep,
            [
                "https://docker-mirror.huawei.example",
                "https://registry-1.docker.io"
            ]
        );
        assert!(verify_dump(&e.config, &want(), &e.registry).is_empty());
    }

    #[test]
    fn refuses_what_it_cannot_edit_safely() {
        assert_eq!(
            edit(
                Some("root = \"/var/lib/containerd\"\n"),
                &want(),
                Some(V1_6),
                MANAGED_HEADER
            ),
            Err(ConfigError::UnsupportedVersion(1))
        );
        let legacy = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://old.example\"]\n";
        let err = edit(Some(legacy), &want(), Some(V1_6), MANAGED_HEADER).unwrap_err();
        assert!(err.to_string().contains("registryMirrors"), "{err}");
        let not_table = "version = 2\nplugins = 3\n";
        assert_eq!(
            edit(Some(not_table), &want(), Some(V1_6), MANAGED_HEADER),
            Err(ConfigError::NotATable("plugins".into()))
        );
        assert!(matches!(
            edit(Some("version = [\n"), &want(), None, MANAGED_HEADER),
            Err(ConfigError::Parse(_))
        ));
    }

    #[test]
    fn an_operators_hosts_directory_is_kept() {
        let src = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/hosts:/etc/docker/certs.d\"\n";
        let e = edit(Some(src), &want(), Some(V1_6), MANAGED_HEADER).unwrap();
        assert_eq!(
            e.registry,
            Registry::HostsDir("/etc/containerd/hosts".into())
        );
        assert!(
            e.config
                .contains("/etc/containerd/hosts:/etc/docker/certs.d")
        );
        assert_eq!(
            e.hosts[0].path,
            "/etc/containerd/hosts/docker.io/hosts.toml"
        );
    }

    #[test]
    fn verify_names_every_mismatch() {
        let dump = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.k8s.io/pause:3.6\"\n";
        let p = verify_dump(dump, &want(), &Registry::HostsDir(DEFAULT_HOSTS_DIR.into()));
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[0].contains("sandbox_image is registry.k8s.io/pause:3.6 instead of registry.huawei.example/k8s/pause:3.9"), "{p:?}");
        assert!(
            p[1].contains("SystemdCgroup is unset instead of true"),
            "{p:?}"
        );
        assert!(p[2].contains("runc.runtime_type is empty"), "{p:?}");
        assert!(p[3].contains("config_path is ''"), "{p:?}");
    }

    #[test]
    fn hosts_toml_lists_mirrors_in_order() {
        let t = hosts_toml(
            "docker.io",
            &["https://a.example".into(), "https://b.example".into()],
            MANAGED_HEADER,
        );
        insta::assert_snapshot!(t);
    }
}
