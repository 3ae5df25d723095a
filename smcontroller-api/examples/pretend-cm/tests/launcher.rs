//! The launcher tested as a CM module tests itself: with the mockall fakes of
//! `smcontroller-api`'s `mock` feature standing in for the SM controller.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use pretend_cm::{Desired, Launcher, NodeOutcome};
use smcontroller_api::{
    Error, InstanceIdent, InstanceInfo, InstanceState, InstanceStatus, InstanceStatusReceiver,
    MockInstanceRunner, MockNodeConfigHandler, MockSmController, NodeConfigState, NodeConfigStatus,
    NodeId, StartInstance,
};

fn node(id: &str) -> NodeId {
    NodeId::new(id)
}

fn ident(item: &str) -> InstanceIdent {
    InstanceIdent {
        item_id: item.to_owned(),
        subject_id: "subject".to_owned(),
        instance: 0,
        ..InstanceIdent::default()
    }
}

/// The instances of an `update_instances` call, without their (9.0-only) networks.
fn infos(start: &[StartInstance]) -> Vec<InstanceInfo> {
    start.iter().map(|s| s.info.clone()).collect()
}

fn instance(item: &str) -> InstanceInfo {
    InstanceInfo {
        ident: ident(item),
        version: "1.0.0".to_owned(),
        runtime_id: "runc".to_owned(),
        ..InstanceInfo::default()
    }
}

fn config_status(state: NodeConfigState) -> NodeConfigStatus {
    NodeConfigStatus {
        state,
        version: "1.0.0".to_owned(),
        error: None,
    }
}

fn desired(nodes: &[(&str, &[&str])]) -> Desired {
    nodes
        .iter()
        .map(|(id, items)| (node(id), items.iter().copied().map(instance).collect()))
        .collect()
}

fn timeout(id: &str) -> Error {
    Error::Timeout {
        node: node(id),
        request: "get_node_config_status",
        after: Duration::from_secs(5),
    }
}

fn idents(items: &[&str]) -> Vec<InstanceIdent> {
    items.iter().copied().map(ident).collect()
}

fn launcher(config: MockNodeConfigHandler, runner: MockInstanceRunner) -> Launcher {
    Launcher::new(Arc::new(config), Arc::new(runner))
}

#[tokio::test]
async fn starts_the_desired_instances_on_each_node_whose_config_is_installed() {
    let mut config = MockNodeConfigHandler::new();
    config
        .expect_get_node_config_status()
        .times(2)
        .returning(|_| Ok(config_status(NodeConfigState::Installed)));
    let mut runner = MockInstanceRunner::new();
    runner
        .expect_update_instances()
        .withf(|node, stop, start| {
            node.as_str() == "node-a"
                && stop.is_empty()
                && infos(start) == [instance("a1"), instance("a2")]
        })
        .times(1)
        .returning(|_, _, _| Ok(()));
    runner
        .expect_update_instances()
        .withf(|node, stop, start| {
            node.as_str() == "node-b" && stop.is_empty() && infos(start) == [instance("b1")]
        })
        .times(1)
        .returning(|_, _, _| Ok(()));
    let launcher = launcher(config, runner);

    let report = launcher
        .apply(&desired(&[("node-a", &["a1", "a2"]), ("node-b", &["b1"])]))
        .await
        .unwrap();

    let updated = |started| NodeOutcome::Updated {
        stopped: 0,
        started,
    };
    assert_eq!(report[&node("node-a")], updated(2));
    assert_eq!(report[&node("node-b")], updated(1));
    assert_eq!(launcher.running_on(&node("node-a")), idents(&["a1", "a2"]));
}

#[tokio::test]
async fn leaves_alone_nodes_whose_config_is_not_installed() {
    let mut config = MockNodeConfigHandler::new();
    config
        .expect_get_node_config_status()
        .withf(|node| node.as_str() == "absent")
        .times(1)
        .returning(|_| Ok(config_status(NodeConfigState::Absent)));
    config
        .expect_get_node_config_status()
        .withf(|node| node.as_str() == "failed")
        .times(1)
        .returning(|_| Ok(config_status(NodeConfigState::Failed)));
    let mut runner = MockInstanceRunner::new();
    runner.expect_update_instances().never();
    let launcher = launcher(config, runner);

    let report = launcher
        .apply(&desired(&[("absent", &["x"]), ("failed", &["y"])]))
        .await
        .unwrap();

    assert_eq!(
        report[&node("absent")],
        NodeOutcome::NotConfigured(NodeConfigState::Absent)
    );
    assert_eq!(
        report[&node("failed")],
        NodeOutcome::NotConfigured(NodeConfigState::Failed)
    );
    assert!(launcher.running_on(&node("absent")).is_empty());
}

#[tokio::test]
async fn a_node_that_is_not_registered_is_an_outcome_not_an_error() {
    let mut config = MockNodeConfigHandler::new();
    config
        .expect_get_node_config_status()
        .withf(|node| node.as_str() == "gone")
        .times(1)
        .returning(|node| Err(Error::not_found(node.clone())));
    // This one is registered when asked for its config, and gone by the time of the update.
    config
        .expect_get_node_config_status()
        .withf(|node| node.as_str() == "leaving")
        .times(1)
        .returning(|_| Ok(config_status(NodeConfigState::Installed)));
    let mut runner = MockInstanceRunner::new();
    runner
        .expect_update_instances()
        .withf(|node, _, _| node.as_str() == "leaving")
        .times(1)
        .returning(|node, _, _| Err(Error::not_found(node.clone())));
    let launcher = launcher(config, runner);

    let report = launcher
        .apply(&desired(&[("gone", &["x"]), ("leaving", &["y"])]))
        .await
        .unwrap();

    assert_eq!(report[&node("gone")], NodeOutcome::NotRegistered);
    assert_eq!(report[&node("leaving")], NodeOutcome::NotRegistered);
    assert!(launcher.running_on(&node("leaving")).is_empty());
}

#[tokio::test]
async fn a_node_that_times_out_is_tried_again() {
    let calls = AtomicU32::new(0);
    let mut config = MockNodeConfigHandler::new();
    config
        .expect_get_node_config_status()
        .times(2)
        .returning(move |node| match calls.fetch_add(1, Ordering::SeqCst) {
            0 => Err(timeout(node.as_str())),
            _ => Ok(config_status(NodeConfigState::Installed)),
        });
    let mut runner = MockInstanceRunner::new();
    runner
        .expect_update_instances()
        .times(1)
        .returning(|_, _, _| Ok(()));
    let launcher = launcher(config, runner);

    let report = launcher.apply(&desired(&[("slow", &["x"])])).await.unwrap();

    assert_eq!(
        report[&node("slow")],
        NodeOutcome::Updated {
            stopped: 0,
            started: 1
        }
    );
}

#[tokio::test]
async fn a_node_that_keeps_disconnecting_is_given_up_after_the_attempts() {
    let mut config = MockNodeConfigHandler::new();
    config
        .expect_get_node_config_status()
        .times(2)
        .returning(|_| Ok(config_status(NodeConfigState::Installed)));
    let mut runner = MockInstanceRunner::new();
    runner
        .expect_update_instances()
        .times(2)
        .returning(|node, _, _| {
            Err(Error::Disconnected {
                node: node.clone(),
                request: "update_instances",
            })
        });
    let launcher = launcher(config, runner).with_attempts(2);

    let report = launcher
        .apply(&desired(&[("flaky", &["x"])]))
        .await
        .unwrap();

    assert_eq!(
        report[&node("flaky")],
        NodeOutcome::Unreachable {
            attempts: 2,
            last_error: Error::Disconnected {
                node: node("flaky"),
                request: "update_instances",
            },
        }
    );
    assert!(launcher.running_on(&node("flaky")).is_empty());
}

#[tokio::test]
async fn an_error_no_retry_would_fix_ends_the_apply() {
    let mut config = MockNodeConfigHandler::new();
    config
        .expect_get_node_config_status()
        .times(1)
        .returning(|_| Ok(config_status(NodeConfigState::Installed)));
    let mut runner = MockInstanceRunner::new();
    runner
        .expect_update_instances()
        .times(1)
        .returning(|_, _, _| Err(Error::InvalidArgument("runtime_id is empty".to_owned())));
    let launcher = launcher(config, runner);

    // node-b comes after node-a in id order, so it is never reached.
    let error = launcher
        .apply(&desired(&[("node-a", &["x"]), ("node-b", &["y"])]))
        .await
        .unwrap_err();

    assert_eq!(
        error,
        Error::InvalidArgument("runtime_id is empty".to_owned())
    );
}

#[tokio::test]
async fn a_later_apply_sends_only_the_difference() {
    let mut config = MockNodeConfigHandler::new();
    config
        .expect_get_node_config_status()
        .returning(|_| Ok(config_status(NodeConfigState::Installed)));
    let mut runner = MockInstanceRunner::new();
    runner
        .expect_update_instances()
        .withf(|node, stop, start| {
            node.as_str() == "n"
                && stop.is_empty()
                && infos(start) == [instance("a"), instance("b")]
        })
        .times(1)
        .returning(|_, _, _| Ok(()));
    runner
        .expect_update_instances()
        .withf(|node, stop, start| {
            node.as_str() == "n" && stop == idents(&["a"]) && infos(start) == [instance("c")]
        })
        .times(1)
        .returning(|_, _, _| Ok(()));
    // A node no longer named in the desired set has everything stopped.
    runner
        .expect_update_instances()
        .withf(|node, stop, start| {
            node.as_str() == "n" && stop == idents(&["b", "c"]) && start.is_empty()
        })
        .times(1)
        .returning(|_, _, _| Ok(()));
    let launcher = launcher(config, runner);

    launcher
        .apply(&desired(&[("n", &["a", "b"])]))
        .await
        .unwrap();
    let report = launcher
        .apply(&desired(&[("n", &["b", "c"])]))
        .await
        .unwrap();
    assert_eq!(
        report[&node("n")],
        NodeOutcome::Updated {
            stopped: 1,
            started: 1
        }
    );

    // Nothing changed: no command at all, not even the config check.
    let report = launcher
        .apply(&desired(&[("n", &["b", "c"])]))
        .await
        .unwrap();
    assert_eq!(report[&node("n")], NodeOutcome::UpToDate);

    let report = launcher.apply(&Desired::new()).await.unwrap();
    assert_eq!(
        report[&node("n")],
        NodeOutcome::Updated {
            stopped: 2,
            started: 0
        }
    );
    assert!(launcher.running_on(&node("n")).is_empty());
}

#[tokio::test]
async fn what_the_node_reports_corrects_what_the_launcher_believes() {
    let mut config = MockNodeConfigHandler::new();
    config
        .expect_get_node_config_status()
        .returning(|_| Ok(config_status(NodeConfigState::Installed)));
    let mut runner = MockInstanceRunner::new();
    runner
        .expect_update_instances()
        .withf(|_, stop, start| stop.is_empty() && infos(start) == [instance("a"), instance("b")])
        .times(1)
        .returning(|_, _, _| Ok(()));
    // `a` crashed: the next apply starts it again, and only it.
    runner
        .expect_update_instances()
        .withf(|_, stop, start| stop.is_empty() && infos(start) == [instance("a")])
        .times(1)
        .returning(|_, _, _| Ok(()));
    let launcher = launcher(config, runner);
    let want = desired(&[("n", &["a", "b"])]);

    launcher.apply(&want).await.unwrap();
    let crashed = InstanceStatus {
        ident: ident("a"),
        version: "1.0.0".to_owned(),
        runtime_id: "runc".to_owned(),
        manifest_digest: String::new(),
        env_vars: Vec::new(),
        state: InstanceState::Failed,
        error: None,
    };
    launcher
        .on_instance_status_received(&node("n"), &crashed)
        .await;
    assert_eq!(launcher.running_on(&node("n")), idents(&["b"]));
    launcher.apply(&want).await.unwrap();

    // A snapshot replaces everything the launcher believed about the node.
    let active = InstanceStatus {
        ident: ident("z"),
        state: InstanceState::Active,
        ..crashed
    };
    launcher
        .on_node_instances_statuses_received(&node("n"), &[active])
        .await;
    assert_eq!(launcher.running_on(&node("n")), idents(&["z"]));
}

#[tokio::test]
async fn one_fake_can_stand_for_the_whole_controller() {
    let mut controller = MockSmController::new();
    controller
        .expect_get_node_config_status()
        .withf(|node| node.as_str() == "n")
        .times(1)
        .returning(|_| Ok(config_status(NodeConfigState::Installed)));
    controller
        .expect_update_instances()
        .withf(|node, stop, start| node.as_str() == "n" && stop.is_empty() && start.len() == 1)
        .times(1)
        .returning(|_, _, _| Ok(()));
    let launcher = Launcher::for_controller(Arc::new(controller));

    let report = launcher.apply(&desired(&[("n", &["a"])])).await.unwrap();

    assert_eq!(
        report[&node("n")],
        NodeOutcome::Updated {
            stopped: 0,
            started: 1
        }
    );
}
