//! Commands through the api traits, over real loopback gRPC (R-ROUTE-1, R-SYNC-1, R-SYNC-2,
//! R-ASYNC-1, R-LOG-1, R-CLOUD-1, R-BLOB-1).

mod support;

use std::time::{Duration, Instant, SystemTime};

use pb::{sm_incoming_messages::SmIncomingMessage, sm_outgoing_messages::SmOutgoingMessage};
use smcontroller_api::{
    Error, InstanceFilter, InstanceIdent, InstanceInfo, InstanceRunner, LogProvider, LogRequest,
    LogType, MonitoringProvider, NodeConfig, NodeConfigHandler, NodeConfigState, NodeId,
    NodeNetwork, StartInstance, UpdateNetworkParameters,
};
use smcontroller_grpc::{proto::servicemanager::v5 as pb, server::ServerSettings};
use support::{Harness, average_monitoring, router_settings};
use tonic::Code;

fn config(version: &str) -> NodeConfig {
    NodeConfig {
        priority: 1,
        labels: vec!["mainNode".into()],
        ..NodeConfig::new(version, "main")
    }
}

fn node(id: &str) -> NodeId {
    NodeId::new(id)
}

#[tokio::test]
async fn r_route_1_a_node_that_is_not_registered_is_not_found_at_once() {
    let h = Harness::start().await;
    let _other = h.sm("present").await;
    let started = Instant::now();
    let err = h.controller.get_node_config_status(&node("absent")).await;
    assert_eq!(err, Err(Error::not_found("absent")));
    let err = h
        .controller
        .update_instances(&node("absent"), &[], &[])
        .await;
    assert_eq!(err, Err(Error::not_found("absent")));
    assert!(started.elapsed() < Duration::from_secs(1));
    h.stop().await;
}

#[tokio::test]
async fn r_sync_1_get_check_set_and_average_monitoring_get_their_replies() {
    let h = Harness::start().await;
    let mut sm = h.sm("n1").await;
    let c = h.controller.clone();

    let call = tokio::spawn(async move {
        let status = c.get_node_config_status(&node("n1")).await?;
        c.check_node_config(&node("n1"), &config("1.0.0")).await?;
        c.update_node_config(&node("n1"), &config("1.0.0")).await?;
        let monitoring = c.get_average_monitoring(&node("n1")).await?;
        Ok::<_, Error>((status, monitoring))
    });

    assert!(matches!(
        sm.recv().await,
        SmIncomingMessage::GetNodeConfigStatus(_)
    ));
    sm.config_status("absent", "").await;

    let SmIncomingMessage::CheckNodeConfig(check) = sm.recv().await else {
        panic!("expected check_node_config")
    };
    assert_eq!(check.version, "1.0.0");
    let json: serde_json::Value = serde_json::from_str(&check.node_config).unwrap();
    assert_eq!(json["version"], "1.0.0");
    assert_eq!(json["labels"][0], "mainNode");
    sm.config_status("absent", "1.0.0").await;

    let SmIncomingMessage::SetNodeConfig(set) = sm.recv().await else {
        panic!("expected set_node_config")
    };
    assert_eq!(set.version, "1.0.0");
    sm.config_status("installed", "1.0.0").await;

    assert!(matches!(
        sm.recv().await,
        SmIncomingMessage::GetAverageMonitoring(_)
    ));
    sm.send(average_monitoring(4242)).await;

    let (status, monitoring) = call.await.unwrap().unwrap();
    assert_eq!(status.state, NodeConfigState::Absent);
    assert_eq!(monitoring.node.ram, 4242);
    h.stop().await;
}

#[tokio::test]
async fn r_sync_1_a_node_reported_error_becomes_failed() {
    let h = Harness::start().await;
    let mut sm = h.sm("n1").await;
    let c = h.controller.clone();
    let call = tokio::spawn(async move { c.check_node_config(&node("n1"), &config("9")).await });
    assert!(matches!(
        sm.recv().await,
        SmIncomingMessage::CheckNodeConfig(_)
    ));
    sm.send(SmOutgoingMessage::NodeConfigStatus(pb::NodeConfigStatus {
        state: "failed".into(),
        version: "9".into(),
        error: Some(smcontroller_grpc::proto::common::v2::ErrorInfo {
            aos_code: 7,
            exit_code: 2,
            message: "bad config".into(),
        }),
    }))
    .await;
    assert_eq!(
        call.await.unwrap(),
        Err(Error::Failed {
            aos_code: 7,
            exit_code: 2,
            message: "bad config".into()
        })
    );
    h.stop().await;
}

#[tokio::test]
async fn r_sync_1_no_reply_in_time_is_a_timeout() {
    let h = Harness::with(
        router_settings(Duration::from_millis(300)),
        ServerSettings::default(),
    )
    .await;
    let mut sm = h.sm("n1").await;
    let result = h.controller.get_average_monitoring(&node("n1")).await;
    assert!(
        matches!(result, Err(Error::Timeout { request, .. }) if request == "get_average_monitoring"),
        "{result:?}"
    );
    assert!(matches!(
        sm.recv().await,
        SmIncomingMessage::GetAverageMonitoring(_)
    ));
    // The stream is still up: the next call is answered.
    let c = h.controller.clone();
    let call = tokio::spawn(async move { c.get_node_config_status(&node("n1")).await });
    assert!(matches!(
        sm.recv().await,
        SmIncomingMessage::GetNodeConfigStatus(_)
    ));
    sm.config_status("installed", "3").await;
    assert_eq!(call.await.unwrap().unwrap().version, "3");
    h.stop().await;
}

#[tokio::test]
async fn r_sync_2_two_callers_on_one_node_and_kind_each_get_their_own_reply() {
    let h = Harness::start().await;
    let mut sm = h.sm("n1").await;
    let first = tokio::spawn({
        let c = h.controller.clone();
        async move { c.get_node_config_status(&node("n1")).await }
    });
    assert!(matches!(
        sm.recv().await,
        SmIncomingMessage::GetNodeConfigStatus(_)
    ));
    let second = tokio::spawn({
        let c = h.controller.clone();
        async move { c.get_node_config_status(&node("n1")).await }
    });
    assert!(matches!(
        sm.recv().await,
        SmIncomingMessage::GetNodeConfigStatus(_)
    ));
    sm.config_status("installed", "first").await;
    sm.config_status("installed", "second").await;
    assert_eq!(first.await.unwrap().unwrap().version, "first");
    assert_eq!(second.await.unwrap().unwrap().version, "second");
    h.stop().await;
}

#[tokio::test]
async fn r_sync_2_an_unanswered_check_does_not_steal_the_next_requests_reply() {
    let h = Harness::with(
        router_settings(Duration::from_secs(2)),
        ServerSettings::default(),
    )
    .await;
    let mut sm = h.sm("n1").await;
    let unanswered = tokio::spawn({
        let c = h.controller.clone();
        async move { c.check_node_config(&node("n1"), &config("1")).await }
    });
    assert!(matches!(
        sm.recv().await,
        SmIncomingMessage::CheckNodeConfig(_)
    ));
    let answered = tokio::spawn({
        let c = h.controller.clone();
        async move { c.check_node_config(&node("n1"), &config("2")).await }
    });
    let SmIncomingMessage::CheckNodeConfig(second) = sm.recv().await else {
        panic!("expected the second check")
    };
    // The SM could not parse the first config and never answers it; it answers the second.
    sm.config_status("installed", &second.version).await;
    assert_eq!(answered.await.unwrap(), Ok(()));
    let first = unanswered.await.unwrap();
    assert!(matches!(first, Err(Error::Timeout { .. })), "{first:?}");
    h.stop().await;
}

#[tokio::test]
async fn r_sync_2_a_reply_nobody_waits_for_is_dropped_and_the_stream_stays_up() {
    let h = Harness::start().await;
    let mut sm = h.sm("n1").await;
    sm.config_status("installed", "stray").await;
    sm.send(average_monitoring(1)).await;
    // The reader handles messages in order: once this sample reaches the receiver, both stray
    // replies have been read (and dropped).
    sm.send(support::monitoring(77)).await;
    h.log
        .wait_until("marker sample", |events| {
            events.iter().any(|e| support::ram_of(e) == Some(77))
        })
        .await;
    let call = tokio::spawn({
        let c = h.controller.clone();
        async move { c.get_node_config_status(&node("n1")).await }
    });
    assert!(matches!(
        sm.recv().await,
        SmIncomingMessage::GetNodeConfigStatus(_)
    ));
    sm.config_status("installed", "fresh").await;
    assert_eq!(call.await.unwrap().unwrap().version, "fresh");
    assert_eq!(h.controller.node_count(), 1);
    h.stop().await;
}

#[tokio::test]
async fn r_async_1_commands_reach_the_sm_in_call_order() {
    let h = Harness::start().await;
    let mut sm = h.sm("n1").await;
    let ident = |i: u64| InstanceIdent {
        item_id: "svc".into(),
        subject_id: "subj".into(),
        instance: i,
        ..InstanceIdent::default()
    };
    for i in 0..50u64 {
        if i % 2 == 0 {
            let start: StartInstance = InstanceInfo {
                ident: ident(i),
                version: "1.0.0".into(),
                ..InstanceInfo::default()
            }
            .into();
            h.controller
                .update_instances(&node("n1"), &[ident(i + 1000)], &[start])
                .await
                .unwrap();
        } else {
            let net = UpdateNetworkParameters {
                network_id: format!("net-{i}"),
                subnet: "172.17.0.0/16".into(),
                ip: "172.17.0.2".into(),
                vlan_id: i,
            };
            h.controller
                .update_networks(&node("n1"), &[net])
                .await
                .unwrap();
        }
    }
    for i in 0..50u64 {
        match sm.recv().await {
            SmIncomingMessage::UpdateInstances(u) => {
                assert_eq!(i % 2, 0);
                assert_eq!(u.start_instances[0].instance.as_ref().unwrap().instance, i);
                assert_eq!(u.stop_instances[0].instance, i + 1000);
            }
            SmIncomingMessage::UpdateNetworks(n) => {
                assert_eq!(i % 2, 1);
                assert_eq!(n.networks[0].vlan_id, i);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    h.stop().await;
}

fn log_request(log_type: LogType, nodes: &[&str]) -> LogRequest {
    LogRequest {
        correlation_id: "corr-1".into(),
        log_type,
        node_ids: nodes.iter().map(|n| node(n)).collect(),
        instance_filter: InstanceFilter {
            item_id: Some("svc".into()),
            subject_id: None,
            instance: None,
        },
        from: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
        till: None,
    }
}

#[tokio::test]
async fn r_log_1_log_requests_go_to_the_listed_nodes_with_the_right_oneof() {
    let h = Harness::start().await;
    let mut a = h.sm("a").await;
    let mut b = h.sm("b").await;

    h.controller
        .request_log(&log_request(LogType::System, &["a"]))
        .await
        .unwrap();
    let SmIncomingMessage::SystemLogRequest(r) = a.recv().await else {
        panic!("expected system_log_request")
    };
    assert_eq!(r.correlation_id, "corr-1");
    assert_eq!(r.from.unwrap().seconds, 1_700_000_000);
    assert!(r.till.is_none());
    assert!(b.nothing_within(Duration::from_millis(100)).await);

    // An empty node list means every registered node.
    h.controller
        .request_log(&log_request(LogType::Instance, &[]))
        .await
        .unwrap();
    for sm in [&mut a, &mut b] {
        let SmIncomingMessage::InstanceLogRequest(r) = sm.recv().await else {
            panic!("expected instance_log_request")
        };
        let filter = r.filter.unwrap();
        assert_eq!(filter.item_id, "svc");
        assert_eq!(filter.subject_id, "");
        assert_eq!(filter.instance, -1);
    }

    h.controller
        .request_log(&log_request(LogType::Crash, &["b"]))
        .await
        .unwrap();
    assert!(matches!(
        b.recv().await,
        SmIncomingMessage::InstanceCrashLogRequest(_)
    ));
    h.stop().await;
}

#[tokio::test]
async fn r_log_1_a_missing_node_fails_the_request_and_nothing_is_sent() {
    let h = Harness::start().await;
    let mut a = h.sm("a").await;
    let err = h
        .controller
        .request_log(&log_request(LogType::System, &["a", "ghost", "phantom"]))
        .await;
    assert_eq!(
        err,
        Err(Error::NotFound {
            nodes: vec![node("ghost"), node("phantom")]
        })
    );
    assert!(err.unwrap_err().to_string().contains("ghost, phantom"));
    assert!(a.nothing_within(Duration::from_millis(200)).await);
    h.stop().await;
}

#[tokio::test]
async fn r_cloud_1_cloud_changes_reach_every_registered_node() {
    let h = Harness::start().await;
    let mut nodes = Vec::new();
    for i in 0..5 {
        nodes.push(h.sm(&format!("n{i}")).await);
    }
    h.controller.set_cloud_connected(true);
    h.controller.set_cloud_connected(false);
    for sm in &mut nodes {
        for connected in [true, false] {
            assert_eq!(sm.recv().await, support::cloud_status(connected));
        }
    }
    h.stop().await;
}

#[tokio::test]
async fn r_cloud_1_the_controller_follows_a_cloud_connection_publisher() {
    let h = Harness::start().await;
    let mut sm = h.sm("n1").await;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut cloud = smcontroller_api::MockCloudConnection::new();
    cloud.expect_is_connected().return_const(false);
    cloud.expect_subscribe().return_once(move || rx);
    h.controller.follow_cloud(&cloud);
    tx.send(true).unwrap();
    assert_eq!(sm.recv().await, support::cloud_status(true));
    h.stop().await;
}

#[tokio::test]
async fn r_blob_1_get_blobs_infos_answers_one_url_per_digest_in_order() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let digests = vec![
        "sha256:b".to_owned(),
        "sha256:a".to_owned(),
        "sha256:c".to_owned(),
    ];
    let urls = client
        .get_blobs_infos(pb::BlobsInfosRequest {
            digests: digests.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .urls;
    assert_eq!(
        urls,
        digests
            .iter()
            .map(|d| format!("https://blobs.example/{d}"))
            .collect::<Vec<_>>()
    );

    let empty = client
        .get_blobs_infos(pb::BlobsInfosRequest { digests: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert!(empty.urls.is_empty());

    let status = client
        .get_blobs_infos(pb::BlobsInfosRequest {
            digests: vec!["sha256:a".into(), "missing-1".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("missing-1"), "{status:?}");
    h.stop().await;
}
