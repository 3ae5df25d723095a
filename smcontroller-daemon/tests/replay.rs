//! The real SM's session (`shared/fixtures/real-aos/sm-session.jsonl`) replayed against the
//! controller over real gRPC on loopback (R-REG-1, R-SYNC-1, R-TEL-1, R-BLOB-1).
//!
//! A scripted SM sends the real SM's recorded bytes; the CM side makes the api call behind each
//! recorded command. The SM checks that each command reaches it meaning what the recorded one
//! means, then sends what the real SM sent after it. Every call must get the recorded answer,
//! and the receivers must hear every recorded message, in order.

mod support;

#[path = "../../smcontroller-grpc/tests/real_aos/mod.rs"]
mod real_aos;

use std::{collections::HashMap, sync::Arc};

use async_trait::async_trait;
use real_aos::{Dir, Line, SM_SESSION, assert_same_command};
use smcontroller_api::{
    Error, InstanceRunner, ItemInfoProvider, LogProvider, LogRequest, LogStatus, LogType,
    MonitoringProvider, NodeConfig, NodeConfigHandler, NodeConfigState, NodeConfigStatus, NodeId,
    NodeMonitoringData,
};
use smcontroller_grpc::{
    proto::servicemanager::v5::{
        BlobsInfosRequest, SmIncomingMessages, sm_incoming_messages::SmIncomingMessage,
        sm_service_client::SmServiceClient,
    },
    server::{self, ServerSettings},
};
use smcontroller_routing::{Controller, Inbound, LogQuery, Outbound, Receivers, Settings};
use support::{DEADLINE, Event, EventLog, TestSm};
use tokio::{sync::watch, task::JoinHandle};

/// The node id the real SM registered with.
const NODE: &str = "node-a";

/// `GetBlobsInfos` as the recording answered it: each recorded digest has its recorded URL.
struct RecordedBlobs(HashMap<String, String>);

impl RecordedBlobs {
    fn of(lines: &[Line]) -> Self {
        let requests = lines.iter().filter(|l| l.dir == Dir::BlobsRequest);
        let replies = lines.iter().filter(|l| l.dir == Dir::BlobsReply);
        let urls = requests
            .zip(replies)
            .flat_map(|(request, reply)| {
                let (digests, urls) = (request.blobs_request().digests, reply.blobs_reply().urls);
                assert_eq!(digests.len(), urls.len(), "{reply}: one URL per digest");
                digests.into_iter().zip(urls)
            })
            .collect();
        Self(urls)
    }
}

#[async_trait]
impl ItemInfoProvider for RecordedBlobs {
    async fn get_blob_url(&self, digest: &str) -> smcontroller_api::Result<String> {
        self.0
            .get(digest)
            .cloned()
            .ok_or_else(|| Error::InvalidArgument(format!("{digest} is not in the recording")))
    }
}

/// A controller served on 127.0.0.1 over plain HTTP/2, as `support::Harness` serves one, with
/// the recorded blob URLs.
struct Served {
    url: String,
    controller: Controller,
    log: Arc<EventLog>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl Served {
    async fn start(items: RecordedBlobs) -> Self {
        let log = Arc::new(EventLog::default());
        let controller = Controller::new(Settings::default(), Receivers::all(log.clone()));
        let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, mut stopped) = watch::channel(false);
        let server = tokio::spawn({
            let controller = controller.clone();
            async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|s| *s).await;
                };
                let items = Arc::new(items);
                server::serve_insecure(
                    listener,
                    controller,
                    items,
                    ServerSettings::default(),
                    shutdown,
                )
                .await
                .unwrap();
            }
        });
        Self {
            url,
            controller,
            log,
            stop,
            server,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        self.controller.shutdown().await;
        tokio::time::timeout(DEADLINE, self.server)
            .await
            .expect("the server stops within the deadline")
            .unwrap();
    }
}

/// What an api call gives back.
#[derive(Debug, PartialEq)]
enum Answer {
    Status(NodeConfigStatus),
    Monitoring(NodeMonitoringData),
    /// `Ok(())`: check/set accepted, or a command queued.
    Done,
}

/// Makes the api call that sends `command` to the node, as a task; `None` for the cloud
/// status, which the controller sends on its own.
fn call(controller: &Controller, command: Outbound) -> Option<JoinHandle<Result<Answer, Error>>> {
    match command {
        Outbound::ConnectionStatus(_) => return None,
        Outbound::UpdateNetworks(_) => panic!("the recording has no update_networks"),
        _ => {}
    }
    let c = controller.clone();
    let node = NodeId::new(NODE);
    let log = |query: LogQuery, log_type| LogRequest {
        correlation_id: query.correlation_id,
        log_type,
        node_ids: vec![NodeId::new(NODE)],
        instance_filter: query.filter,
        from: query.from,
        till: query.till,
    };
    let done = |()| Answer::Done;
    Some(tokio::spawn(async move {
        match command {
            Outbound::GetNodeConfigStatus => {
                c.get_node_config_status(&node).await.map(Answer::Status)
            }
            Outbound::CheckNodeConfig(config) => {
                c.check_node_config(&node, &config).await.map(done)
            }
            Outbound::SetNodeConfig(config) => c.update_node_config(&node, &config).await.map(done),
            Outbound::GetAverageMonitoring => c
                .get_average_monitoring(&node)
                .await
                .map(Answer::Monitoring),
            Outbound::UpdateInstances { stop, start } => {
                c.update_instances(&node, &stop, &start).await.map(done)
            }
            Outbound::SystemLog(q) => c.request_log(&log(*q, LogType::System)).await.map(done),
            Outbound::InstanceLog(q) => c.request_log(&log(*q, LogType::Instance)).await.map(done),
            Outbound::CrashLog(q) => c.request_log(&log(*q, LogType::Crash)).await.map(done),
            Outbound::ConnectionStatus(_) | Outbound::UpdateNetworks(_) => unreachable!(),
        }
    }))
}

/// The answer the recording gives `command`: the reply among the lines that follow it (up to
/// the next command), or `Done`.
fn recorded_answer(command: &Outbound, following: &[Line]) -> Answer {
    let mut replies = following
        .iter()
        .take_while(|l| l.dir != Dir::CmToSm)
        .filter(|l| l.dir == Dir::SmToCm)
        .map(|l| Inbound::try_from(l.sm_outgoing()).unwrap_or_else(|e| panic!("{l}: {e}")));
    match command {
        Outbound::GetNodeConfigStatus => replies
            .find_map(|m| match m {
                Inbound::NodeConfigStatus(status) => Some(Answer::Status(status)),
                _ => None,
            })
            .expect("the recording answers get_node_config_status"),
        Outbound::GetAverageMonitoring => replies
            .find_map(|m| match m {
                Inbound::AverageMonitoring(data) => Some(Answer::Monitoring(data)),
                _ => None,
            })
            .expect("the recording answers get_average_monitoring"),
        _ => Answer::Done,
    }
}

/// What the receivers hear of one message from the node (contract section 2, R-TEL-1).
fn heard(message: Inbound) -> Vec<Event> {
    let node = || NODE.to_owned();
    match message {
        Inbound::SmInfo(info) => vec![Event::Connected(node()), Event::SmInfo(node(), info)],
        Inbound::NodeInstancesStatus(statuses) => vec![Event::NodeInstances(node(), statuses)],
        Inbound::UpdateInstancesStatus(statuses) => {
            let env_vars: Vec<_> = statuses
                .iter()
                .filter(|s| !s.env_vars.is_empty())
                .map(|s| smcontroller_api::InstanceEnvVarsStatus {
                    ident: s.ident.clone(),
                    statuses: s.env_vars.clone(),
                })
                .collect();
            let mut events: Vec<Event> = statuses
                .into_iter()
                .map(|s| Event::InstanceStatus(node(), s))
                .collect();
            if !env_vars.is_empty() {
                events.push(Event::EnvVars(node(), env_vars));
            }
            events
        }
        Inbound::Log(mut part) => {
            part.node_id = NodeId::new(NODE);
            vec![Event::Log(part)]
        }
        Inbound::InstantMonitoring(data) => vec![Event::Monitoring(node(), data)],
        Inbound::Alert(alert) => vec![Event::Alert(node(), alert)],
        // Sync replies go to their callers, not to a receiver.
        Inbound::NodeConfigStatus(_) | Inbound::AverageMonitoring(_) => vec![],
    }
}

/// A call on its way, with the answer the recording gave it.
struct Pending {
    line: Line,
    task: JoinHandle<Result<Answer, Error>>,
    expected: Answer,
}

impl Pending {
    async fn finish(self) {
        let Self {
            line,
            task,
            expected,
        } = self;
        let answer = tokio::time::timeout(DEADLINE, task)
            .await
            .unwrap_or_else(|_| panic!("{line}: the call did not return within {DEADLINE:?}"))
            .expect("the call task does not panic")
            .unwrap_or_else(|e| panic!("{line}: the call failed: {e}"));
        if let Answer::Status(status) = &answer {
            // The real SM reported an empty error: a success, whole (R-SYNC-1).
            assert_eq!(status.state, NodeConfigState::Installed, "{line}");
            assert_eq!(status.version, "1.0.0", "{line}");
            assert_eq!(status.error, None, "{line}");
        }
        assert_eq!(answer, expected, "{line}: not the recorded answer");
    }
}

#[tokio::test]
async fn r_sync_1_r_tel_1_the_real_sm_replayed_gets_every_recorded_answer_and_is_heard() {
    let lines = real_aos::load(SM_SESSION);
    let served = Served::start(RecordedBlobs::of(&lines)).await;
    // R-REG-1: the cloud is connected before the SM registers, so the controller's first
    // message on the new stream is the recorded connection_status.
    served.controller.set_cloud_connected(true);
    let (mut sm, mut blobs) = tokio::time::timeout(DEADLINE, async {
        let sm = TestSm::open_raw(&served.url).await;
        (
            sm,
            SmServiceClient::connect(served.url.clone()).await.unwrap(),
        )
    })
    .await
    .expect("connected within the deadline");

    let mut registered = false;
    let mut pending: Option<Pending> = None;
    let mut blobs_request: Option<BlobsInfosRequest> = None;
    let mut expected_events = Vec::new();
    let mut calls = 0;
    for (index, line) in lines.iter().enumerate() {
        match line.dir {
            Dir::CmToSm => {
                // The SM handles one command at a time: the previous call is over.
                if let Some(previous) = pending.take() {
                    previous.finish().await;
                }
                let recorded = line.sm_incoming();
                let command = match Outbound::try_from(recorded.clone()) {
                    Ok(command) => command,
                    Err(error) => {
                        // The "config without nodeGroupSubject" check: our api cannot build a
                        // NodeConfig without nodeGroupSubject, so no call can send it (and the
                        // real SM sent no reply to it). The call is skipped; the document is
                        // shown not to be a NodeConfig.
                        assert!(
                            line.note.contains("without nodeGroupSubject"),
                            "{line}: {error}"
                        );
                        assert!(
                            error.to_string().contains("nodeGroupSubject"),
                            "{line}: {error}"
                        );
                        let Some(SmIncomingMessage::CheckNodeConfig(check)) =
                            recorded.sm_incoming_message
                        else {
                            panic!("{line}: not a check_node_config")
                        };
                        let parsed = NodeConfig::from_json(&check.node_config);
                        assert!(parsed.is_err(), "{line}: decoded into {parsed:?}");
                        continue;
                    }
                };
                if !registered && !matches!(command, Outbound::ConnectionStatus(_)) {
                    // A call needs the node registered: wait for the controller to hear sm_info.
                    let is_info = |e: &Event| matches!(e, Event::SmInfo(n, _) if n == NODE);
                    served.log.wait_count("node-a registered", 1, is_info).await;
                    registered = true;
                }
                let expected = recorded_answer(&command, &lines[index + 1..]);
                let task = call(&served.controller, command);
                let got = sm.recv().await;
                let got = SmIncomingMessages {
                    sm_incoming_message: Some(got),
                };
                assert_same_command(line, &got, &recorded);
                if let Some(task) = task {
                    calls += 1;
                    pending = Some(Pending {
                        line: line.clone(),
                        task,
                        expected,
                    });
                }
            }
            Dir::SmToCm => {
                let message = line.sm_outgoing();
                let inbound = Inbound::try_from(message.clone())
                    .unwrap_or_else(|e| panic!("{line}: does not convert: {e}"));
                expected_events.extend(heard(inbound));
                let sent = tokio::time::timeout(DEADLINE, sm.tx.send(message)).await;
                assert!(
                    matches!(sent, Ok(Ok(()))),
                    "{line}: not sent within {DEADLINE:?} (stream closed or stalled)"
                );
            }
            Dir::BlobsRequest => blobs_request = Some(line.blobs_request()),
            Dir::BlobsReply => {
                let request = blobs_request
                    .take()
                    .expect("a blobs-request before its reply");
                let reply = tokio::time::timeout(DEADLINE, blobs.get_blobs_infos(request))
                    .await
                    .unwrap_or_else(|_| panic!("{line}: no reply within {DEADLINE:?}"))
                    .unwrap_or_else(|status| panic!("{line}: GetBlobsInfos failed: {status}"))
                    .into_inner();
                assert_eq!(reply, line.blobs_reply(), "{line}: not the recorded reply");
            }
        }
    }
    if let Some(last) = pending.take() {
        last.finish().await;
    }
    // connection_status is not a call, and the check without nodeGroupSubject was skipped.
    assert_eq!(calls, 10, "api calls made");

    // Every message the real SM sent reached its receiver, in the order it was sent (R-TEL-1).
    served
        .log
        .wait_until("every recorded message heard", |events| {
            events.len() >= expected_events.len()
        })
        .await;
    let events = served.log.events();
    assert_eq!(events, expected_events);
    let mut logs = 0;
    for event in &events {
        match event {
            Event::InstanceStatus(_, status) => {
                assert_eq!(status.error, None, "{status:?}");
                assert!(
                    status.env_vars.iter().all(|e| e.error.is_none()),
                    "{status:?}"
                );
            }
            Event::EnvVars(_, statuses) => {
                assert!(
                    statuses
                        .iter()
                        .flat_map(|s| &s.statuses)
                        .all(|e| e.error.is_none())
                );
            }
            Event::Log(part) => {
                assert_eq!(part.node_id.as_str(), NODE, "{part:?}");
                assert_eq!(part.status, LogStatus::Ok, "{part:?}");
                assert_eq!(part.error, None, "{part:?}");
                logs += 1;
            }
            _ => {}
        }
    }
    let count = |pred: fn(&Event) -> bool| events.iter().filter(|e| pred(e)).count();
    assert_eq!(logs, 6, "log parts");
    assert_eq!(
        count(|e| matches!(e, Event::InstanceStatus(..))),
        1,
        "instance statuses"
    );
    assert_eq!(count(|e| matches!(e, Event::Alert(..))), 5, "alerts");
    assert_eq!(
        count(|e| matches!(e, Event::Monitoring(..))),
        8,
        "instant monitoring"
    );
    assert!(events.iter().all(|e| e.node() == NODE));

    served.stop().await;
}
