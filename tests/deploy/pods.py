"""The pods of a deployment as a node would see them, built offline for tests.

`simulate(builds, directory)` makes a real PKI for the certificates the
manifests ask cert-manager for (`gcks.cluster.pki.pki_init`, one cluster CA
and one member CA shared by all `builds`, as in a multi-region deployment),
fills the Secrets the way cert-manager would (tls.crt, tls.key, ca.crt), makes
a storage key (`write_storage_key_file`), and then lays out every pod of every
StatefulSet under its own directory with `tests.deploy.kube`: mounted files,
environment, and the image's command line, all with container paths moved
under that directory. Nothing here starts a node or opens a socket.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gcks.cluster.config import write_storage_key_file
from gcks.cluster.pki import ISSUER_OF, CaKind, PkiLayout, ca_paths, cert_paths, pki_init
from gcks.proto.identity import Identity, Role
from tests.deploy import dockerfile
from tests.deploy.kube import (
    Build,
    Doc,
    container_environment,
    mount_volumes,
    of_kind,
    one,
    pod_names,
    reroot,
    reroot_toml,
)

# The Secrets that hold the two CAs (cert-manager's CA Issuers sign with them).
CA_SECRETS: Mapping[str, CaKind] = {
    "gcks-cluster-ca": CaKind.CLUSTER,
    "gcks-member-ca": CaKind.MEMBER,
}
STORAGE_KEY_SECRET = "gcks-storage-key"
STORAGE_KEY_ITEM = "storage-key"


@dataclass(frozen=True)
class SimulatedPod:
    """One pod: its name, its build, and what its container sees, rooted at `root`."""

    name: str
    build: Build
    statefulset: Doc
    container: Doc
    root: Path
    environment: dict[str, str]  # GCKS_* paths already moved under root
    argv: list[str]  # the image's ENTRYPOINT + CMD (or the container's override)
    config_path: Path  # the --config file under root, paths inside moved under root


def leaf_identities(docs: list[Doc]) -> dict[str, Identity]:
    """Secret name -> the identity of the (non-CA) Certificate that fills it."""
    return {
        c["spec"]["secretName"]: Identity.from_uri(c["spec"]["uris"][0])
        for c in of_kind(docs, "Certificate")
        if not c["spec"].get("isCA")
    }


def issuing_ca(docs: list[Doc], certificate_name: str) -> CaKind:
    """Which gcks CA signs the Certificate `certificate_name` (through its CA Issuer)."""
    certificate = one(docs, "Certificate", certificate_name)
    issuer = one(docs, "Issuer", certificate["spec"]["issuerRef"]["name"])
    return CA_SECRETS[issuer["spec"]["ca"]["secretName"]]


def _secrets(docs: list[Doc], layout: PkiLayout, storage_key: bytes) -> dict[str, dict[str, bytes]]:
    directory = layout.directory
    ca_files = {kind: ca_paths(directory, kind) for kind in CaKind}
    secrets: dict[str, dict[str, bytes]] = {STORAGE_KEY_SECRET: {STORAGE_KEY_ITEM: storage_key}}
    for name, kind in CA_SECRETS.items():
        cert, key = ca_files[kind]
        secrets[name] = {"tls.crt": cert.read_bytes(), "tls.key": key.read_bytes()}
        secrets[name]["ca.crt"] = secrets[name]["tls.crt"]
    for secret_name, identity in leaf_identities(docs).items():
        cert, key = cert_paths(directory, identity.role, identity.id)
        ca_cert = ca_files[ISSUER_OF[identity.role]][0]
        secrets[secret_name] = {
            "tls.crt": cert.read_bytes(),
            "tls.key": key.read_bytes(),
            "ca.crt": ca_cert.read_bytes(),
        }
    return secrets


def simulate(builds: list[Build], directory: Path) -> list[SimulatedPod]:
    """Every pod of every StatefulSet in `builds`, laid out under `directory`."""
    identities = [i for b in builds for i in leaf_identities(b.docs).values()]

    def ids(role: Role) -> list[str]:
        return sorted({i.id for i in identities if i.role is role})

    layout = pki_init(
        directory / "pki",
        nodes=ids(Role.NODE),
        members=ids(Role.MEMBER),
        admins=ids(Role.ADMIN),
    )
    write_storage_key_file(directory / "storage-key")
    storage_key = (directory / "storage-key").read_bytes()
    image_argv = [
        *dockerfile.last(dockerfile.final_stage(), "ENTRYPOINT").exec_form(),
        *dockerfile.last(dockerfile.final_stage(), "CMD").exec_form(),
    ]
    pods: list[SimulatedPod] = []
    for current in builds:
        secrets = _secrets(current.docs, layout, storage_key)
        config_maps = {c["metadata"]["name"]: c["data"] for c in of_kind(current.docs, "ConfigMap")}
        statefulset = one(current.docs, "StatefulSet")
        namespace = statefulset["metadata"]["namespace"]
        (container,) = statefulset["spec"]["template"]["spec"]["containers"]
        argv = container.get("command", image_argv[:1]) + container.get("args", image_argv[1:])
        for pod in pod_names(statefulset):
            root = directory / "pods" / pod
            mount_volumes(statefulset, container, root, config_maps=config_maps, secrets=secrets)
            config_path = Path(reroot(argv[argv.index("--config") + 1], root))
            mode = config_path.stat().st_mode
            config_path.chmod(0o600)  # mounted read-only (0400); rewritten here once
            config_path.write_text(reroot_toml(config_path.read_text(), root))
            config_path.chmod(mode)
            pods.append(
                SimulatedPod(
                    name=pod,
                    build=current,
                    statefulset=statefulset,
                    container=container,
                    root=root,
                    environment={
                        k: reroot(v, root)
                        for k, v in container_environment(container, pod, namespace).items()
                    },
                    argv=[reroot(arg, root) for arg in argv],
                    config_path=config_path,
                )
            )
    return pods
