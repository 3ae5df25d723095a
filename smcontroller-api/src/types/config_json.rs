//! The node configuration JSON document, written as the reference controller writes it and read
//! as a real SM reads it.
//!
//! A real SM reads the keys of a node configuration case-insensitively (`NodeGroupSubject`,
//! `nodegroupsubject` and `nodeGroupSubject` are one key), and cannot read a configuration
//! without `nodeGroupSubject.codename`. [`NodeConfig::from_json`] does the same: it first rewrites
//! every object key that matches a known key regardless of case to that key's spelling, then
//! reads the document with serde. Keys it does not know are kept and ignored.

use std::collections::HashSet;

use serde_json::{Map, Value};

use super::{Codename, NodeConfig};

/// Every key of a node configuration document, in the spelling [`NodeConfig::to_json`] writes.
const KEYS: &[&str] = &[
    "version",
    "node",
    "nodeGroupSubject",
    "codename",
    "alertRules",
    "ram",
    "cpu",
    "partitions",
    "download",
    "upload",
    "name",
    "minTimeout",
    "minThreshold",
    "maxThreshold",
    "resourceRatios",
    "storage",
    "state",
    "labels",
    "priority",
];

/// Why a document is not a node configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeConfigJsonError {
    /// Not JSON, or not the shape of a node configuration (a missing `nodeGroupSubject`, a
    /// wrong type, a bad ISO 8601 duration); the message is the parser's and names the key.
    #[error("not a node configuration: {0}")]
    Invalid(String),
    /// One object has the same key twice, spelled in different cases.
    #[error("key {key:?} appears more than once (keys are read case-insensitively)")]
    DuplicateKey {
        /// The key, as [`NodeConfig::to_json`] spells it.
        key: &'static str,
    },
}

impl NodeConfig {
    /// A configuration of `version` for the node group (node type) `node_group_subject`, with
    /// nothing else set.
    pub fn new(version: impl Into<String>, node_group_subject: impl Into<String>) -> Self {
        Self {
            version: version.into(),
            node: None,
            node_group_subject: Codename {
                codename: node_group_subject.into(),
            },
            alert_rules: None,
            resource_ratios: None,
            labels: Vec::new(),
            priority: 0,
        }
    }

    /// The JSON document, with the keys the reference controller writes, in its order.
    pub fn to_json(&self) -> String {
        // String keys only, and the duration serializer cannot fail.
        serde_json::to_string(self).expect("a NodeConfig always serializes to JSON")
    }

    /// Reads a document the way a real SM does: keys case-insensitively, `nodeGroupSubject`
    /// with its `codename` required, unknown keys ignored.
    pub fn from_json(json: &str) -> Result<Self, NodeConfigJsonError> {
        let mut value: Value =
            serde_json::from_str(json).map_err(|e| NodeConfigJsonError::Invalid(e.to_string()))?;
        canonical_keys(&mut value)?;
        serde_json::from_value(value).map_err(|e| NodeConfigJsonError::Invalid(e.to_string()))
    }
}

/// Rewrites, in every object of `value`, each key that equals a known key but for case to the
/// known spelling.
fn canonical_keys(value: &mut Value) -> Result<(), NodeConfigJsonError> {
    match value {
        Value::Object(object) => {
            let mut seen = HashSet::new();
            let mut renamed = Map::with_capacity(object.len());
            for (key, mut inner) in std::mem::take(object) {
                canonical_keys(&mut inner)?;
                let key = match KEYS.iter().find(|k| k.eq_ignore_ascii_case(&key)) {
                    Some(known) => {
                        if !seen.insert(*known) {
                            return Err(NodeConfigJsonError::DuplicateKey { key: known });
                        }
                        (*known).to_owned()
                    }
                    None => key,
                };
                renamed.insert(key, inner);
            }
            *object = renamed;
        }
        Value::Array(items) => {
            for item in items {
                canonical_keys(item)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::types::{AlertRulePercents, AlertRules};

    #[test]
    fn reads_keys_in_any_case_as_a_real_sm_does() {
        let config = NodeConfig::from_json(
            r#"{"VERSION":"1.0.0","NodeGroupSubject":{"CodeName":"main"},
                "alertrules":{"RAM":{"mintimeout":"PT1M","minthreshold":0.1,"MaxThreshold":0.9}},
                "Labels":["a"],"PRIORITY":3,"somethingNew":true}"#,
        )
        .unwrap();
        let mut expected = NodeConfig::new("1.0.0", "main");
        expected.alert_rules = Some(AlertRules {
            ram: Some(AlertRulePercents {
                min_timeout: Duration::from_secs(60),
                min_threshold: 0.1,
                max_threshold: 0.9,
            }),
            ..AlertRules::default()
        });
        expected.labels = vec!["a".into()];
        expected.priority = 3;
        assert_eq!(config, expected);
    }

    #[test]
    fn a_config_without_node_group_subject_is_refused_naming_it() {
        let err = NodeConfig::from_json(r#"{"version":"3.0.0"}"#).unwrap_err();
        assert!(err.to_string().contains("nodeGroupSubject"), "{err}");
        let err =
            NodeConfig::from_json(r#"{"version":"3.0.0","nodeGroupSubject":{}}"#).unwrap_err();
        assert!(err.to_string().contains("codename"), "{err}");
    }

    #[test]
    fn the_same_key_in_two_spellings_is_refused() {
        let err = NodeConfig::from_json(
            r#"{"version":"1","Version":"2","nodeGroupSubject":{"codename":"m"}}"#,
        )
        .unwrap_err();
        assert_eq!(err, NodeConfigJsonError::DuplicateKey { key: "version" });
    }

    #[test]
    fn writes_what_the_reference_writes() {
        let mut config = NodeConfig::new("1.0.1", "peer-node");
        config.node = Some(Codename {
            codename: "node-a".into(),
        });
        config.labels = vec!["peer".into()];
        config.priority = 10;
        // Byte for byte the reference controller's document (fixtures/real-aos/cm-session.jsonl).
        assert_eq!(
            config.to_json(),
            r#"{"version":"1.0.1","node":{"codename":"node-a"},"nodeGroupSubject":{"codename":"peer-node"},"labels":["peer"],"priority":10}"#
        );
        assert_eq!(NodeConfig::from_json(&config.to_json()).unwrap(), config);
    }
}
