//! The cluster file as a JSON Schema, derived from [`crate::spec`]: for
//! editors (yaml-language-server's `# yaml-language-server: $schema=`) and
//! for checks in CI. The schema describes the file's shape only; what it
//! cannot say (overlapping networks, a gateway without a public IP) is
//! [`crate::validate`]'s job, so a file the schema accepts may still be
//! refused by `skybridge validate`, never the other way round.
//!
//! The repository keeps the generated schema in `schema/cluster.schema.json`;
//! a test keeps the two equal.

use serde_json::{Value, json};

use crate::spec::ClusterDoc;
use crate::validate::{API_VERSION, KIND};

/// The schema, pretty-printed, as `skybridge schema` prints it.
pub fn json() -> String {
    let mut schema = schemars::schema_for!(ClusterDoc).to_value();
    if let Some(top) = schema.as_object_mut() {
        top.insert("title".into(), json!("Skybridge cluster file"));
        top.insert(
            "description".into(),
            json!(
                "The cluster file `skybridge validate` reads (apiVersion skybridge.dev/v1alpha1)."
            ),
        );
    }
    // Only one apiVersion and kind exist: the schema says so, as validation does.
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        props.insert("apiVersion".into(), json!({ "const": API_VERSION }));
        props.insert("kind".into(), json!({ "const": KIND }));
    }
    let mut text = serde_json::to_string_pretty(&schema).expect("a JSON value serializes");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn validator() -> jsonschema::Validator {
        let schema: Value = serde_json::from_str(&json()).unwrap();
        jsonschema::validator_for(&schema).expect("the schema is a valid JSON Schema")
    }

    fn yaml(text: &str) -> Value {
        serde_saphyr::from_str(text).expect("YAML parses")
    }

    fn examples() -> Vec<(PathBuf, String)> {
        let mut files: Vec<(PathBuf, String)> = std::fs::read_dir(repo().join("examples"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .map(|p| {
                let text = std::fs::read_to_string(&p).unwrap();
                (p, text)
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn the_committed_schema_is_the_generated_one() {
        let path = repo().join("schema/cluster.schema.json");
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == json(),
            "{} is out of date: run `skybridge schema > schema/cluster.schema.json`",
            path.display()
        );
    }

    #[test]
    fn every_example_file_satisfies_the_schema() {
        let v = validator();
        let files = examples();
        assert!(files.len() >= 3, "{files:?}");
        for (path, text) in files {
            let errors: Vec<String> = v.iter_errors(&yaml(&text)).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
        }
    }

    #[test]
    fn files_validation_refuses_for_their_shape_are_refused_by_the_schema_too() {
        let v = validator();
        let seed = std::fs::read_to_string(repo().join("examples/seed.yaml")).unwrap();
        let broken = [
            (
                "a misspelled field",
                seed.replacen("privateIP:", "privateIp:", 1),
            ),
            (
                "an unknown transport",
                seed.replace("transport: gre ", "transport: ipsec "),
            ),
            ("a text MTU", seed.replace("mtu: 1500", "mtu: large")),
            (
                "another apiVersion",
                seed.replace("skybridge.dev/v1alpha1", "skybridge.dev/v2"),
            ),
            ("no sites", seed.replace("  sites:", "  sitez:")),
            (
                "an unknown role",
                seed.replace("roles: [worker]", "roles: [master]"),
            ),
        ];
        for (what, text) in broken {
            assert_ne!(text, seed, "{what}: the mutation must change the file");
            assert!(crate::load(&text).is_err(), "{what}: validation accepts it");
            assert!(!v.is_valid(&yaml(&text)), "{what}: the schema accepts it");
        }
    }
}
