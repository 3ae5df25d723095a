//! The wire traffic recorded from the Aos reference implementation (`shared/fixtures/real-aos`):
//! where it is, its lines decoded with the project's generated types, and what "the same
//! command" means when ours is compared with the reference's.
//!
//! Shared by `smcontroller-grpc/tests/recordings.rs` and `smcontroller-daemon/tests/replay.rs`
//! (there through `#[path]`), so it uses only what both crates depend on.

#![allow(dead_code)]

use std::{
    fmt,
    path::{Path, PathBuf},
};

use prost::Message;
use smcontroller_grpc::proto::servicemanager::v5::{
    BlobsInfos, BlobsInfosRequest, SmIncomingMessages, SmOutgoingMessages,
    sm_incoming_messages::SmIncomingMessage,
};

/// The environment variable that points the tests at another fixture folder.
pub(crate) const OVERRIDE: &str = "SMCONTROLLER_FIXTURES";

/// The real SM client's session: its `sm->cm` lines and `blobs-request` are real bytes.
pub(crate) const SM_SESSION: &str = "sm-session.jsonl";

/// The real SM controller's session: its `cm->sm` lines are real bytes.
pub(crate) const CM_SESSION: &str = "cm-session.jsonl";

/// The folder of the recordings: `$SMCONTROLLER_FIXTURES` if set, else
/// `<workspace>/../shared/fixtures/real-aos` (CI has `shared/` beside the clone).
pub(crate) fn fixture_dir() -> PathBuf {
    match std::env::var_os(OVERRIDE) {
        Some(dir) => PathBuf::from(dir),
        None => {
            // The crate's folder is `<workspace>/<crate>`.
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("a crate folder has a parent: the workspace");
            let beside = workspace.parent().unwrap_or(workspace);
            beside.join("shared/fixtures/real-aos")
        }
    }
}

/// Which way a recorded message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// `SMOutgoingMessages`, SM to controller.
    SmToCm,
    /// `SMIncomingMessages`, controller to SM.
    CmToSm,
    /// The SM's `GetBlobsInfos` request.
    BlobsRequest,
    /// The controller's `GetBlobsInfos` reply.
    BlobsReply,
}

/// One recorded message.
#[derive(Debug, Clone)]
pub(crate) struct Line {
    /// `sm-session.jsonl` or `cm-session.jsonl`.
    pub file: &'static str,
    /// 1-based line number in the file.
    pub number: usize,
    /// Which way it went.
    pub dir: Dir,
    /// The oneof case, or the message type.
    pub kind: String,
    /// The encoded message.
    pub bytes: Vec<u8>,
    /// The recorder's remark, often empty.
    pub note: String,
}

impl Dir {
    /// The spelling of the recording.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::SmToCm => "sm->cm",
            Self::CmToSm => "cm->sm",
            Self::BlobsRequest => "blobs-request",
            Self::BlobsReply => "blobs-reply",
        }
    }
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (file, number, dir, kind) = (self.file, self.number, self.dir.as_str(), &self.kind);
        write!(f, "{file} line {number} ({dir} {kind}")?;
        if !self.note.is_empty() {
            write!(f, ", {:?}", self.note)?;
        }
        f.write_str(")")
    }
}

impl Line {
    /// The message, which must be a `what` going `dir`.
    fn decode<M: Message + Default>(&self, dir: Dir, what: &str) -> M {
        assert_eq!(self.dir, dir, "{self} is not a {what}");
        M::decode(self.bytes.as_slice()).unwrap_or_else(|e| panic!("{self}: not a {what}: {e}"))
    }

    pub(crate) fn sm_outgoing(&self) -> SmOutgoingMessages {
        self.decode(Dir::SmToCm, "SMOutgoingMessages")
    }

    pub(crate) fn sm_incoming(&self) -> SmIncomingMessages {
        self.decode(Dir::CmToSm, "SMIncomingMessages")
    }

    pub(crate) fn blobs_request(&self) -> BlobsInfosRequest {
        self.decode(Dir::BlobsRequest, "BlobsInfosRequest")
    }

    pub(crate) fn blobs_reply(&self) -> BlobsInfos {
        self.decode(Dir::BlobsReply, "BlobsInfos")
    }
}

/// Every line of `file` in the fixture folder. Fails, saying where it looked and how to point
/// it elsewhere, if the folder or the file is not there: these tests never skip.
pub(crate) fn load(file: &'static str) -> Vec<Line> {
    load_from(&fixture_dir(), file)
}

/// [`load`] from `dir`.
pub(crate) fn load_from(dir: &Path, file: &'static str) -> Vec<Line> {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "the recordings of the real Aos are missing: cannot read {} ({e}). The tests look \
             in the folder named by the environment variable {OVERRIDE} if it is set (it is \
             {}), else in <workspace>/../shared/fixtures/real-aos; to run them, put the fixtures \
             there or set {OVERRIDE} to the folder that holds {SM_SESSION} and {CM_SESSION}",
            path.display(),
            if std::env::var_os(OVERRIDE).is_some() {
                "set"
            } else {
                "not set"
            },
        )
    });
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| parse(file, index + 1, line))
        .collect()
}

fn parse(file: &'static str, number: usize, line: &str) -> Line {
    let json: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{file} line {number}: not JSON: {e}"));
    let field = |name: &str| {
        json[name]
            .as_str()
            .unwrap_or_else(|| panic!("{file} line {number}: no string {name:?}"))
            .to_owned()
    };
    let dir = field("dir");
    let dir = [Dir::SmToCm, Dir::CmToSm, Dir::BlobsRequest, Dir::BlobsReply]
        .into_iter()
        .find(|d| d.as_str() == dir)
        .unwrap_or_else(|| panic!("{file} line {number}: unknown dir {dir:?}"));
    Line {
        file,
        number,
        dir,
        kind: field("kind"),
        bytes: hex(&field("hex")).unwrap_or_else(|| panic!("{file} line {number}: bad hex")),
        note: field("note"),
    }
}

/// Decodes lowercase or uppercase hex; `None` on an odd length or a non-hex digit.
fn hex(text: &str) -> Option<Vec<u8>> {
    let digits: Option<Vec<u8>> = text.chars().map(|c| Some(c.to_digit(16)? as u8)).collect();
    let digits = digits.filter(|d| d.len() % 2 == 0)?;
    Some(
        digits
            .chunks(2)
            .map(|pair| (pair[0] << 4) | pair[1])
            .collect(),
    )
}

/// Panics, naming `what`, unless `ours` means the same as `recorded`: the same prost message
/// field by field, except that node configuration documents are compared as JSON values
/// (numbers by numeric value, object keys in any order).
pub(crate) fn assert_same_command(
    what: &dyn fmt::Display,
    ours: &SmIncomingMessages,
    recorded: &SmIncomingMessages,
) {
    let (ours_rest, ours_json) = split_config(ours);
    let (recorded_rest, recorded_json) = split_config(recorded);
    assert_eq!(
        ours_rest, recorded_rest,
        "{what}: our command differs from the recorded one (node config documents aside)"
    );
    match (ours_json, recorded_json) {
        (None, None) => {}
        (Some(ours), Some(recorded)) => {
            let parse = |json: &str, whose: &str| -> serde_json::Value {
                serde_json::from_str(json)
                    .unwrap_or_else(|e| panic!("{what}: {whose} node config is not JSON: {e}"))
            };
            if let Err(at) = same_json("$", &parse(&ours, "our"), &parse(&recorded, "recorded")) {
                panic!(
                    "{what}: the node config documents differ at {at}\n ours:     {ours}\n \
                     recorded: {recorded}"
                );
            }
        }
        (ours, recorded) => panic!("{what}: node config {ours:?} vs recorded {recorded:?}"),
    }
}

/// The message with its node configuration document taken out, and the document.
fn split_config(message: &SmIncomingMessages) -> (SmIncomingMessages, Option<String>) {
    let mut message = message.clone();
    let json = match &mut message.sm_incoming_message {
        Some(SmIncomingMessage::CheckNodeConfig(c)) => Some(std::mem::take(&mut c.node_config)),
        Some(SmIncomingMessage::SetNodeConfig(c)) => Some(std::mem::take(&mut c.node_config)),
        _ => None,
    };
    (message, json)
}

/// Whether two JSON values mean the same; `Err` names the first place where they do not.
pub(crate) fn same_json(
    at: &str,
    ours: &serde_json::Value,
    recorded: &serde_json::Value,
) -> Result<(), String> {
    use serde_json::Value;
    let differ = || Err(format!("{at}: {ours} vs recorded {recorded}"));
    match (ours, recorded) {
        (Value::Number(a), Value::Number(b)) => {
            // An integer has one representation, so integers compare exactly; 50 and 50.0 are
            // the same number.
            let same = if a.is_f64() || b.is_f64() {
                a.as_f64() == b.as_f64()
            } else {
                a == b
            };
            if same { Ok(()) } else { differ() }
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                return differ();
            }
            a.iter()
                .zip(b)
                .enumerate()
                .try_for_each(|(i, (a, b))| same_json(&format!("{at}[{i}]"), a, b))
        }
        (Value::Object(a), Value::Object(b)) => {
            if let Some(key) = a
                .keys()
                .chain(b.keys())
                .find(|k| a.contains_key(*k) != b.contains_key(*k))
            {
                return Err(format!(
                    "{at}.{key}: only in {}",
                    if a.contains_key(key) {
                        "ours"
                    } else {
                        "the recorded one"
                    }
                ));
            }
            a.iter()
                .try_for_each(|(key, a)| same_json(&format!("{at}.{key}"), a, &b[key]))
        }
        (a, b) if a == b => Ok(()),
        _ => differ(),
    }
}
