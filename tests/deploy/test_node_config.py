"""Each pod of the StatefulSets gets a node configuration that `gcks node` accepts,
and the manifests agree with it: ports, probes, DNS names, certificates, quorum.

The pods are laid out offline (`tests.deploy.pods`): the ConfigMap, the
Secrets cert-manager would fill (from a real `gcks pki init`), the storage key
and the environment, then the image's own command line is run with
`--check-config` through the real CLI.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import pytest

from gcks.cluster import cli
from gcks.cluster.config import ENV_PREFIX, NodeConfig, load_config
from gcks.cluster.node import Node
from gcks.cluster.pki import ISSUER_OF
from gcks.member.config import parse_member_config
from gcks.proto.identity import Identity, Role
from tests.deploy import dockerfile
from tests.deploy.kube import K8S, Doc, build, of_kind, one, pod_names
from tests.deploy.pods import SimulatedPod, issuing_ca, leaf_identities, simulate

REGIONS = sorted(p for p in (K8S / "multi-region").iterdir() if p.name != "base")
# The multi-region example is written for inter-region round trips up to this.
WAN_MAX_RTT_MS = 300
# How long a stopping leader may spend handing leadership over.
LEADERSHIP_TRANSFER_S = inspect.signature(Node.stop).parameters["timeout_s"].default


@pytest.fixture(scope="module")
def single_cluster(tmp_path_factory: pytest.TempPathFactory) -> list[SimulatedPod]:
    return simulate([build(K8S)], tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def multi_region(tmp_path_factory: pytest.TempPathFactory) -> list[SimulatedPod]:
    return simulate([build(region) for region in REGIONS], tmp_path_factory.mktemp("regions"))


@pytest.fixture(params=["single_cluster", "multi_region"])
def pods(request: pytest.FixtureRequest) -> list[SimulatedPod]:
    result: list[SimulatedPod] = request.getfixturevalue(request.param)
    return result


def _load(pod: SimulatedPod) -> NodeConfig:
    return load_config(pod.config_path, environ=pod.environment)


def _container_port(pod: SimulatedPod, name: str) -> tuple[int, str]:
    (port,) = [p for p in pod.container["ports"] if p["name"] == name]
    return port["containerPort"], port["protocol"]


def test_image_command_passes_check_config_in_every_pod(
    pods: list[SimulatedPod], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gcks node --config /etc/gcks/node.toml` (the image's CMD) parses with the
    real CLI and accepts the configuration each pod is given."""
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for pod in pods:
        assert pod.argv[0] == "gcks"
        with monkeypatch.context() as patch:
            for name, value in pod.environment.items():
                patch.setenv(name, value)
            status = cli.main([*pod.argv[1:], "--check-config"])
        assert status == cli.EXIT_OK, capsys.readouterr().err


def test_node_id_is_the_pod_name_and_its_certificate_names_it(pods: list[SimulatedPod]) -> None:
    for pod in pods:
        config = _load(pod)
        assert config.node_id == pod.name
        assert Identity(Role.NODE, pod.name) in leaf_identities(pod.build.docs).values()


def test_address_book_lists_exactly_the_pods_of_the_deployment(pods: list[SimulatedPod]) -> None:
    names = {pod.name for pod in pods}
    for pod in pods:
        assert set(_load(pod).peers) == names


def test_single_cluster_peers_use_stable_pod_dns_names(single_cluster: list[SimulatedPod]) -> None:
    """gcks-N.<headless service>.<namespace>.svc.cluster.local, resolvable before
    the pods are ready (there is no leader, hence no readiness, until they talk)."""
    pod = single_cluster[0]
    statefulset = pod.statefulset
    service = one(pod.build.docs, "Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    namespace = statefulset["metadata"]["namespace"]
    for peer_id, entry in _load(pod).peers.items():
        expected = f"{peer_id}.{service['metadata']['name']}.{namespace}.svc.cluster.local"
        for address in (entry.peer, entry.member, entry.probe, entry.ops, entry.admin):
            assert address is not None
            assert address.host == expected


def test_node_certificates_carry_the_pod_dns_name(single_cluster: list[SimulatedPod]) -> None:
    docs = single_cluster[0].build.docs
    config = _load(single_cluster[0])
    for certificate in of_kind(docs, "Certificate"):
        identity_uris = certificate["spec"].get("uris", [])
        if identity_uris and Identity.from_uri(identity_uris[0]).role is Role.NODE:
            node = Identity.from_uri(identity_uris[0]).id
            assert certificate["spec"]["dnsNames"] == [config.peers[node].peer.host]


@pytest.mark.parametrize("directory", [K8S, *REGIONS], ids=lambda p: p.name)
def test_certificates_are_signed_by_the_ca_of_their_role(directory: Path) -> None:
    """Nodes and admins by the cluster CA, members by the member CA (gcks.cluster.pki)."""
    docs = build(directory).docs
    for certificate in of_kind(docs, "Certificate"):
        if certificate["spec"].get("isCA"):
            continue
        identity = Identity.from_uri(certificate["spec"]["uris"][0])
        assert issuing_ca(docs, certificate["metadata"]["name"]) is ISSUER_OF[identity.role]


def test_disruption_budget_keeps_a_majority(single_cluster: list[SimulatedPod]) -> None:
    docs = single_cluster[0].build.docs
    statefulset = single_cluster[0].statefulset
    budget = one(docs, "PodDisruptionBudget")
    replicas = statefulset["spec"]["replicas"]
    assert budget["spec"]["maxUnavailable"] == math.floor((replicas - 1) / 2)
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_probes_hit_the_ops_listener(pods: list[SimulatedPod]) -> None:
    for pod in pods:
        config = _load(pod)
        ops_port, protocol = _container_port(pod, "ops")
        assert (ops_port, protocol) == (config.ops_listen.port, "TCP")
        own_ops = config.peers[pod.name].ops
        assert own_ops is None or own_ops.port == ops_port
        probes = {
            kind: pod.container[f"{kind}Probe"]["httpGet"]
            for kind in ("startup", "liveness", "readiness")
        }
        assert probes["readiness"]["path"] == "/readyz"
        assert probes["liveness"]["path"] == "/healthz"
        assert probes["startup"]["path"] == "/healthz"
        for probe in probes.values():
            assert probe["port"] == "ops"
        annotations = pod.statefulset["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(ops_port)


def test_container_ports_are_the_listen_ports(pods: list[SimulatedPod]) -> None:
    for pod in pods:
        config = _load(pod)
        assert _container_port(pod, "peer") == (config.peer_listen.port, "TCP")
        assert _container_port(pod, "member") == (config.member_listen.port, "TCP")
        assert _container_port(pod, "probe") == (config.probe_listen.port, "UDP")
        assert _container_port(pod, "admin") == (config.admin_listen.port, "TCP")
        entry = config.peers[pod.name]
        assert (entry.peer.port, entry.member.port, entry.probe.port) == (
            config.peer_listen.port,
            config.member_listen.port,
            config.probe_listen.port,
        )


def test_services_target_named_container_ports_with_their_protocol(
    pods: list[SimulatedPod],
) -> None:
    for pod in pods:
        for service in of_kind(pod.build.docs, "Service"):
            for port in service["spec"]["ports"]:
                number, protocol = _container_port(pod, port["targetPort"])
                assert (port["port"], port["protocol"]) == (number, protocol)


def test_statefulset_starts_pods_in_parallel_and_stops_them_gracefully(
    pods: list[SimulatedPod],
) -> None:
    for pod in pods:
        spec = pod.statefulset["spec"]
        assert spec["podManagementPolicy"] == "Parallel"
        assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
        pod_spec = spec["template"]["spec"]
        command = pod.container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        pause = int(command[1])
        # The pause and the node's own leadership transfer fit, with room to exit.
        assert pod_spec["terminationGracePeriodSeconds"] >= pause + LEADERSHIP_TRANSFER_S + 10


def test_pod_runs_restricted(pods: list[SimulatedPod]) -> None:
    user, group = dockerfile.last(dockerfile.final_stage(), "USER").arguments.split(":")
    for pod in pods:
        pod_spec = pod.statefulset["spec"]["template"]["spec"]
        context = pod_spec["securityContext"]
        assert context["runAsNonRoot"] is True
        assert (context["runAsUser"], context["runAsGroup"]) == (int(user), int(group))
        assert context["fsGroup"] == int(group)
        assert context["seccompProfile"]["type"] == "RuntimeDefault"
        container_context = pod.container["securityContext"]
        assert container_context["readOnlyRootFilesystem"] is True
        assert container_context["allowPrivilegeEscalation"] is False
        assert container_context["capabilities"]["drop"] == ["ALL"]
        assert pod_spec["automountServiceAccountToken"] is False
        assert pod_spec["enableServiceLinks"] is False
        (key_volume,) = [v for v in pod_spec["volumes"] if v["name"] == "storage-key"]
        assert key_volume["secret"]["defaultMode"] == 0o400


def test_node_and_storage_keys_are_mounted_owner_read_only(pods: list[SimulatedPod]) -> None:
    for pod in pods:
        config = _load(pod)
        for path in (config.tls.key, pod.root / "run/secrets/gcks/storage-key"):
            assert path.stat().st_mode & 0o777 == 0o400


def test_data_directory_is_the_claimed_volume_and_the_image_volume(
    pods: list[SimulatedPod],
) -> None:
    (volume,) = dockerfile.last(dockerfile.final_stage(), "VOLUME").exec_form()
    for pod in pods:
        config = _load(pod)
        (mount,) = [m for m in pod.container["volumeMounts"] if m["name"] == "data"]
        assert mount["mountPath"] == volume
        assert config.data_dir == pod.root / volume.lstrip("/")


def test_multi_region_has_one_voter_per_region_and_wan_timing(
    multi_region: list[SimulatedPod],
) -> None:
    assert len(multi_region) == len(REGIONS) == 3
    for pod in multi_region:
        assert pod.statefulset["spec"]["replicas"] == 1
        assert not of_kind(pod.build.docs, "PodDisruptionBudget")
        raft = _load(pod).raft
        assert raft.tick_ms * raft.election_ticks >= 10 * WAN_MAX_RTT_MS
        assert raft.tick_ms * raft.heartbeat_ticks >= WAN_MAX_RTT_MS


def test_multi_region_members_discover_their_own_region(
    multi_region: list[SimulatedPod], tmp_path: Path
) -> None:
    """The member configuration resolves the region's members' Service: a headless
    Service of ready nodes only, with the node's member and probe ports."""
    for pod in multi_region:
        docs: list[Doc] = pod.build.docs
        text = one(docs, "ConfigMap", "gcks-member-config")["data"]["member.toml"]
        for name in ("tls/cluster-ca.crt", "tls/tls.crt", "tls/tls.key"):
            (tmp_path / "etc/gcks-member" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "etc/gcks-member" / name).write_text("placeholder\n")
        config = parse_member_config(
            text.replace('"/etc/', f'"{tmp_path}/etc/'),
            base_dir=tmp_path,
            environ={"GCKS_MEMBER_MEMBER_ID": "sensor-1"},
        )
        assert config.discovery is not None
        (service,) = [
            s
            for s in of_kind(docs, "Service")
            if s["spec"].get("clusterIP") == "None"
            and not s["spec"].get("publishNotReadyAddresses", False)
        ]
        namespace = service["metadata"]["namespace"]
        assert (
            config.discovery.dns == f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
        )
        ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
        assert (ports["member"], ports["probe"]) == (
            config.discovery.member_port,
            config.discovery.probe_port,
        )


def test_pod_names_follow_the_renamed_statefulsets() -> None:
    names = [pod_names(one(build(r).docs, "StatefulSet")) for r in REGIONS]
    assert sorted(n for group in names for n in group) == sorted(
        f"gcks-{r.name}-0" for r in REGIONS
    )
