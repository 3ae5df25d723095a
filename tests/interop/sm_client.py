#!/usr/bin/env python3
"""A Service Manager written with Python grpcio, for the wire interop test.

It generates its stubs from the repository's proto/ files at start (with grpc_tools.protoc,
into a temporary directory), registers with the SM controller at --url as --node, and then
behaves like the reference SM client on the stream (see shared/spec/wire-protocol.md, "How a
real SM behaves on the stream"), and as the recordings of the real Aos SM show
(shared/fixtures/real-aos):

- it handles its stream serially: each command is handled, and its reply queued, before the next
  one is read, so replies go out in the order of the commands;
- every node_config_status, InstanceStatus, EnvVarStatus and LogData it sends carries an
  `error`, empty (codes 0, no message) when nothing failed;
- a check_node_config or set_node_config whose JSON it cannot read (no nodeGroupSubject with a
  codename; keys are matched regardless of case) gets no reply at all.

Output, one line per event on stdout (flushed), for the test to read:

    RECV <command> <summary> <json>   a command from the controller, decoded by Python
                                      (json: the message as protobuf JSON, proto field names,
                                      fields with default values left out)
    BLOBS <url>,<url>                 the answer of GetBlobsInfos
    BLOBS_ERROR <code> <details>      GetBlobsInfos failed
    END <code> <details>              the RegisterSM stream ended with this status
    END timeout                       --max-seconds passed first

Exit status: 0 when the stream ends with UNAVAILABLE (the controller shutting down) or at
--max-seconds; 1 when it ends any other way; 2 when the stubs cannot be generated.
"""

import argparse
import importlib
import importlib.resources
import json
import os
import queue
import sys
import tempfile
import threading

import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_tools import protoc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(REPO, "proto")
PROTO_FILES = ["common/v2/common.proto", "servicemanager/v5/servicemanager.proto"]

# Fixed values the Rust test compares with what the controller decoded.
MONITORING_TS = (1_700_000_100, 250_000_000)
AVERAGE_TS = (1_700_000_200, 500_000_000)
ALERT_TS = (1_700_000_300, 0)

_print_lock = threading.Lock()


def emit(line):
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def log(message):
    with _print_lock:
        sys.stderr.write("sm_client: " + message + "\n")
        sys.stderr.flush()


def generate_stubs(out_dir):
    """Runs protoc on proto/ into out_dir and imports the generated modules."""
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        "-I" + PROTO_DIR,
        "-I" + well_known,
        "--python_out=" + out_dir,
        "--grpc_python_out=" + out_dir,
    ] + [os.path.join(PROTO_DIR, f) for f in PROTO_FILES]
    code = protoc.main(args)
    if code != 0:
        log("protoc failed with status %d: %s" % (code, " ".join(args)))
        sys.exit(2)
    # Regular packages, so that no installed package named `common` shadows ours.
    for package in ["common", "common/v2", "servicemanager", "servicemanager/v5"]:
        open(os.path.join(out_dir, package, "__init__.py"), "a").close()
    sys.path.insert(0, out_dir)
    common = importlib.import_module("common.v2.common_pb2")
    sm = importlib.import_module("servicemanager.v5.servicemanager_pb2")
    sm_grpc = importlib.import_module("servicemanager.v5.servicemanager_pb2_grpc")
    return common, sm, sm_grpc


def ts(pair):
    seconds, nanos = pair
    return Timestamp(seconds=seconds, nanos=nanos)


def _key(obj, name):
    """The value of key `name` in JSON object `obj`, the key matched regardless of case."""
    if not isinstance(obj, dict):
        return None
    for key, value in obj.items():
        if key.lower() == name.lower():
            return value
    return None


def unreadable(document):
    """Why a real SM cannot read node config `document`, or None when it can."""
    try:
        config = json.loads(document)
    except ValueError as e:
        return "not JSON: %s" % e
    if not isinstance(config, dict):
        return "not a JSON object"
    subject = _key(config, "nodeGroupSubject")
    if subject is None:
        return "no nodeGroupSubject"
    if not isinstance(_key(subject, "codename"), str):
        return "nodeGroupSubject has no codename"
    return None


def as_json(message):
    return json.dumps(
        json_format.MessageToDict(message, preserving_proto_field_name=True),
        separators=(",", ":"),
        sort_keys=True,
    )


class Sm:
    """The state and the answers of the simulated SM."""

    def __init__(self, node, common, sm):
        self.node = node
        self.common = common
        self.pb = sm
        self.outgoing = queue.Queue()
        self.config_state = "absent"
        self.config_version = ""

    # --- what goes out -------------------------------------------------------------------

    def send(self, **oneof):
        self.outgoing.put(self.pb.SMOutgoingMessages(**oneof))

    def requests(self):
        """The request stream of RegisterSM: whatever is queued, until None."""
        while True:
            message = self.outgoing.get()
            if message is None:
                return
            yield message

    def sm_info(self):
        c, pb = self.common, self.pb
        return pb.SMInfo(
            node_id=self.node,
            runtimes=[
                pb.RuntimeInfo(
                    runtime_id="runc-py",
                    type="runc",
                    max_dmips=10_000,
                    allowed_dmips=8_000,
                    total_ram=(4 << 30) + 5,
                    allowed_ram=3 << 30,
                    max_instances=12,
                    os_info=c.OSInfo(
                        os="linux", version="6.1.0", features=["cgroups2", "seccomp"]
                    ),
                    arch_info=c.ArchInfo(architecture="x86_64", variant="v3"),
                )
            ],
            resources=[pb.ResourceInfo(name="gpu", shared_count=2)],
        )

    def preinstalled_status(self):
        c, pb = self.common, self.pb
        return pb.InstanceStatus(
            instance=c.InstanceIdent(
                item_id="py-component",
                subject_id="py-subject",
                instance=3,
                type=c.COMPONENT,
                preinstalled=True,
            ),
            version="0.9.1",
            runtime_id="runc-py",
            manifest_digest="sha256:0123",
            state="active",
            error=self.no_error(),
        )

    def monitoring_data(self, stamp, ram):
        pb = self.pb
        return pb.MonitoringData(
            timestamp=ts(stamp),
            ram=ram,
            cpu=42,
            partitions=[pb.PartitionUsage(name="state", used_size=1 << 33)],
            download=7,
            upload=8,
        )

    def instance_monitoring(self, stamp):
        c, pb = self.common, self.pb
        return pb.InstanceMonitoring(
            instance=c.InstanceIdent(item_id="py-component", subject_id="py-subject", instance=3),
            runtime_id="runc-py",
            monitoring_data=self.monitoring_data(stamp, 2048),
        )

    def register(self):
        pb = self.pb
        self.send(sm_info=self.sm_info())
        self.send(
            node_instances_status=pb.NodeInstancesStatus(instances=[self.preinstalled_status()])
        )
        self.send(
            instant_monitoring=pb.InstantMonitoring(
                node_monitoring=self.monitoring_data(MONITORING_TS, 1111),
                instances_monitoring=[self.instance_monitoring(MONITORING_TS)],
            )
        )
        self.send(
            alert=pb.Alert(
                timestamp=ts(ALERT_TS),
                system_quota_alert=pb.SystemQuotaAlert(parameter="cpu", value=95, status="raise"),
            )
        )

    def no_error(self):
        """The error a real SM sets when nothing failed: present, codes 0, no message."""
        return self.common.ErrorInfo()

    def config_status(self, state, version):
        self.send(
            node_config_status=self.pb.NodeConfigStatus(
                state=state, version=version, error=self.no_error()
            )
        )

    # --- what comes in -------------------------------------------------------------------

    def handle(self, message):
        """Answers one command like the reference SM and prints its RECV line.

        Called for one command at a time, in the order they arrive: its replies are queued
        before the next command is read, so they go out in command order."""
        pb = self.pb
        kind = message.WhichOneof("SMIncomingMessage")
        body = getattr(message, kind)
        summary = "-"
        why = None
        if kind in ("check_node_config", "set_node_config"):
            why = unreadable(body.node_config)
        if why is not None:
            # Like the reference SM: a config it cannot parse gets no answer at all.
            log("cannot parse the node config of %s %s (%s): no reply" % (kind, body.version, why))
            summary = "unparsable,version=" + body.version
        elif kind == "get_node_config_status":
            summary = "state=%s,version=%s" % (self.config_state, self.config_version)
            self.config_status(self.config_state, self.config_version)
        elif kind == "check_node_config":
            summary = "version=" + body.version
            self.config_status(self.config_state, body.version)
        elif kind == "set_node_config":
            self.config_state, self.config_version = "installed", body.version
            summary = "version=" + body.version
            self.config_status(self.config_state, self.config_version)
        elif kind == "get_average_monitoring":
            self.send(
                average_monitoring=pb.AverageMonitoring(
                    node_monitoring=self.monitoring_data(AVERAGE_TS, 4242),
                    instances_monitoring=[self.instance_monitoring(AVERAGE_TS)],
                )
            )
        elif kind == "update_instances":
            summary = "start=%d,stop=%d" % (len(body.start_instances), len(body.stop_instances))
            statuses = [
                pb.InstanceStatus(
                    instance=info.instance,
                    version=info.version,
                    runtime_id=info.runtime_id,
                    manifest_digest=info.manifest_digest,
                    env_vars=[
                        pb.EnvVarStatus(name=env.name, error=self.no_error())
                        for env in info.env_vars
                    ],
                    state="active",
                    error=self.no_error(),
                )
                for info in body.start_instances
            ]
            self.send(update_instances_status=pb.UpdateInstancesStatus(instances=statuses))
        elif kind in ("system_log_request", "instance_log_request", "instance_crash_log_request"):
            summary = "corr=" + body.correlation_id
            data = ("%s of %s\n" % (kind, self.node)).encode()
            self.send(
                log=pb.LogData(
                    correlation_id=body.correlation_id,
                    part_count=1,
                    part=1,
                    data=data,
                    status="ok",
                    error=self.no_error(),
                )
            )
        elif kind == "connection_status":
            summary = pb.ConnectionEnum.Name(body.cloud_status)
        elif kind == "update_networks":
            summary = "vlan=" + ",".join(str(n.vlan_id) for n in body.networks)
        emit("RECV %s %s %s" % (kind, summary, as_json(body)))


def get_blobs(stub, pb):
    try:
        reply = stub.GetBlobsInfos(
            pb.BlobsInfosRequest(digests=["sha256:1111", "sha256:2222"]), timeout=10
        )
        emit("BLOBS " + ",".join(reply.urls))
    except grpc.RpcError as e:
        emit("BLOBS_ERROR %s %s" % (e.code().name, e.details()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="host:port of the SM controller")
    parser.add_argument("--node", default="py-node", help="the node id to register as")
    parser.add_argument("--max-seconds", type=float, default=30.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sm-interop-") as out_dir:
        common, pb, pb_grpc = generate_stubs(out_dir)

        # The keepalive of a real SM: a ping every 10 s, 3 s to answer, also with no call.
        channel = grpc.insecure_channel(
            args.url,
            options=[
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 3_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        stub = pb_grpc.SMServiceStub(channel)
        sm = Sm(args.node, common, pb)
        sm.register()
        call = stub.RegisterSM(sm.requests())

        timed_out = threading.Event()

        def on_timeout():
            timed_out.set()
            call.cancel()

        timer = threading.Timer(args.max_seconds, on_timeout)
        timer.daemon = True
        timer.start()
        blobs = threading.Thread(target=get_blobs, args=(stub, pb), daemon=True)
        blobs.start()

        status = 1
        try:
            for message in call:
                sm.handle(message)
            emit("END OK stream closed by the controller")
        except grpc.RpcError as e:
            if timed_out.is_set():
                emit("END timeout")
                status = 0
            else:
                emit("END %s %s" % (e.code().name, e.details()))
                status = 0 if e.code() == grpc.StatusCode.UNAVAILABLE else 1
        finally:
            timer.cancel()
            sm.outgoing.put(None)
            blobs.join(timeout=10)
            channel.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
