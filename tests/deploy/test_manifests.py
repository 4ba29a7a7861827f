"""The Kubernetes manifests under deploy/k8s are valid and complete, checked offline.

Core kinds validate (strictly: unknown fields are errors) against the schemas
that the `kubernetes-validate` package ships, for the oldest Kubernetes we
support and the newest the package knows; cert-manager kinds (no schema there)
get a structural check. Every manifest belongs to a kustomization, except the
storage key template, which must never be applied by `kubectl apply -k`.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.deploy.kube import (
    DEPLOY,
    K8S,
    Doc,
    build,
    kustomization_dirs,
    load_documents,
    manifest_files,
    of_kind,
    one,
)

# The manifests use persistentVolumeClaimRetentionPolicy (on by default since
# 1.27) and mixed-protocol LoadBalancer Services (GA in 1.26).
OLDEST_KUBERNETES = "1.30.0"
KUBERNETES_VERSIONS = (OLDEST_KUBERNETES, kubernetes_validate.latest_version())
CERT_MANAGER_API = "cert-manager.io/v1"
STORAGE_KEY_TEMPLATE = K8S / "storage-key-secret.example.yaml"
# Applied directly (not only as a base of another kustomization).
TOP_LEVEL_BUILDS = (K8S, *sorted(p for p in (K8S / "multi-region").iterdir() if p.name != "base"))


def _documents() -> list[tuple[str, Doc]]:
    return [
        (f"{path.relative_to(DEPLOY)}#{index}", doc)
        for path in manifest_files()
        for index, doc in enumerate(load_documents(path))
    ]


DOCUMENTS = _documents()
CORE = [(label, doc) for label, doc in DOCUMENTS if doc["apiVersion"] != CERT_MANAGER_API]
CERT_MANAGER = [(label, doc) for label, doc in DOCUMENTS if doc["apiVersion"] == CERT_MANAGER_API]


def test_manifest_set_covers_every_kind_the_deployment_needs() -> None:
    kinds = {doc["kind"] for _, doc in DOCUMENTS}
    assert {
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
        "Issuer",
        "Certificate",
    } <= kinds


@pytest.mark.parametrize("label_doc", DOCUMENTS, ids=[label for label, _ in DOCUMENTS])
def test_every_document_names_api_version_kind_and_name(label_doc: tuple[str, Doc]) -> None:
    _, doc = label_doc
    assert isinstance(doc.get("apiVersion"), str)
    assert isinstance(doc.get("kind"), str)
    assert isinstance(doc["metadata"]["name"], str)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("label_doc", CORE, ids=[label for label, _ in CORE])
def test_core_manifest_validates_strictly_against_kubernetes_schema(
    label_doc: tuple[str, Doc], version: str
) -> None:
    _, doc = label_doc
    kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_a_misspelt_field() -> None:
    """The harness itself: a typo in a StatefulSet is caught, not ignored."""
    statefulset = copy.deepcopy(one(load_documents(K8S / "statefulset.yaml"), "StatefulSet"))
    statefulset["spec"]["replica"] = statefulset["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, OLDEST_KUBERNETES, strict=True)


@pytest.mark.parametrize("label_doc", CERT_MANAGER, ids=[label for label, _ in CERT_MANAGER])
def test_cert_manager_resource_is_well_formed(label_doc: tuple[str, Doc]) -> None:
    _, doc = label_doc
    spec = doc["spec"]
    if doc["kind"] == "Issuer":
        assert len(spec) == 1
        assert "selfSigned" in spec or isinstance(spec["ca"]["secretName"], str)
        return
    assert doc["kind"] == "Certificate"
    assert isinstance(spec["secretName"], str)
    assert spec["issuerRef"]["kind"] == "Issuer"
    assert spec["privateKey"]["algorithm"] == "ECDSA"
    assert spec["privateKey"]["size"] == 256
    if spec.get("isCA"):
        return
    # A leaf: exactly one gcks identity URI, key in PKCS#8 as gcks pki writes it.
    assert [u for u in spec["uris"] if u.startswith("urn:gcks:")] == spec["uris"]
    assert len(spec["uris"]) == 1
    assert spec["privateKey"]["encoding"] == "PKCS8"
    assert "client auth" in spec["usages"]
    assert "digital signature" in spec["usages"]


@pytest.mark.parametrize("directory", TOP_LEVEL_BUILDS, ids=lambda p: p.name)
def test_kustomization_builds_without_dangling_issuer_or_duplicate(directory: Path) -> None:
    docs = build(directory).docs
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "two resources of one kind share a name"
    issuers = {d["metadata"]["name"] for d in of_kind(docs, "Issuer")}
    for certificate in of_kind(docs, "Certificate"):
        assert certificate["spec"]["issuerRef"]["name"] in issuers


def test_every_manifest_is_deployed_except_the_storage_key_template() -> None:
    deployed: set[Path] = set()
    for directory in kustomization_dirs():
        deployed |= build(directory).files
    assert deployed == set(manifest_files()) - {STORAGE_KEY_TEMPLATE}


def test_storage_key_template_holds_no_usable_key() -> None:
    """A filled-in template must not be committed by accident: the placeholder
    is not a key, so a node given it stops with a configuration error."""
    secret = one(load_documents(STORAGE_KEY_TEMPLATE), "Secret")
    placeholder = secret["stringData"]["storage-key"]
    with pytest.raises(ValueError, match="non-hexadecimal"):
        bytes.fromhex(placeholder)
    assert secret["immutable"] is True


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("directory", TOP_LEVEL_BUILDS, ids=lambda p: p.name)
def test_kustomize_builds_what_the_test_model_builds(directory: Path) -> None:
    """The model in tests.deploy.kube is what kustomize itself makes (offline:
    `kubectl kustomize` only reads the directory)."""
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    rendered = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout

    def canonical(docs: list[Doc]) -> list[str]:
        return sorted(json.dumps(doc, sort_keys=True) for doc in docs)

    real = [doc for doc in yaml.safe_load_all(rendered) if doc is not None]
    assert canonical(real) == canonical(build(directory).docs)
