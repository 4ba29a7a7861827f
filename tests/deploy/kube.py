"""An offline model of what Kubernetes does with the manifests under `deploy/k8s`.

Just enough to test the manifests without a cluster: load the YAML documents,
build a kustomization (resources, namespace, and name-changing patches - the
subset `deploy/k8s` uses; anything else is refused so that a new feature
cannot slip past the model), compute a container's environment as the kubelet
does (`fieldRef`, `$(VAR)` expansion), and lay out its volume mounts
(configMap, secret, projected, emptyDir, volumeClaimTemplates) under a
directory that stands for the container's root. Imports PyYAML and the
standard library only; never talks to a cluster or the network.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
KUSTOMIZATION = "kustomization.yaml"

Doc = dict[str, Any]

_KUSTOMIZATION_KEYS = frozenset({"apiVersion", "kind", "namespace", "resources", "patches"})
_CLUSTER_SCOPED = frozenset({"Namespace", "ClusterIssuer"})
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_DEFAULT_FILE_MODE = 0o644


def load_documents(path: Path) -> list[Doc]:
    """Every non-empty YAML document in `path`."""
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest under deploy/k8s (kustomization files excluded)."""
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != KUSTOMIZATION)


def kustomization_dirs() -> list[Path]:
    """Every directory under deploy/k8s that holds a kustomization."""
    return sorted(p.parent for p in K8S.rglob(KUSTOMIZATION))


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    """The single document of `kind` (and `name`, if given)."""
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


@dataclass(frozen=True)
class Build:
    """The output of one kustomization: its documents and the files they came from."""

    directory: Path
    docs: list[Doc]
    files: frozenset[Path]


def build(directory: Path) -> Build:
    """Build the kustomization in `directory` with the subset of kustomize we use."""
    spec = load_documents(directory / KUSTOMIZATION)[0]
    unknown = set(spec) - _KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: the test model does not know {sorted(unknown)}"
    docs: list[Doc] = []
    files: set[Path] = set()
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            inner = build(path)
            docs += inner.docs
            files |= inner.files
        else:
            docs += load_documents(path)
            files.add(path)
    for patch in spec.get("patches", []):
        _apply_rename(docs, patch)
    if (namespace := spec.get("namespace")) is not None:
        for doc in docs:
            if doc["kind"] not in _CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace
    return Build(directory, docs, frozenset(files))


def _apply_rename(docs: list[Doc], patch: Mapping[str, Any]) -> None:
    """A JSON 6902 patch whose only operation replaces /metadata/name."""
    assert patch.get("options") == {"allowNameChange": True}, "only renaming patches are modelled"
    operations = yaml.safe_load(patch["patch"])
    assert [(op["op"], op["path"]) for op in operations] == [("replace", "/metadata/name")]
    target = one(docs, patch["target"]["kind"], patch["target"]["name"])
    target["metadata"]["name"] = operations[0]["value"]


def pod_names(statefulset: Doc) -> list[str]:
    """The pods of a StatefulSet: NAME-0 .. NAME-(replicas-1)."""
    name = statefulset["metadata"]["name"]
    return [f"{name}-{ordinal}" for ordinal in range(statefulset["spec"]["replicas"])]


def container_environment(container: Doc, pod_name: str, namespace: str) -> dict[str, str]:
    """The container's `env` as the kubelet resolves it for pod `pod_name`."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            # $(VAR) refers to a variable defined earlier; an unknown one stays as written.
            env[item["name"]] = _VAR_REF.sub(
                lambda m: env.get(m.group(1), m.group(0)), item["value"]
            )
            continue
        field_path = item["valueFrom"]["fieldRef"]["fieldPath"]
        fields = {"metadata.name": pod_name, "metadata.namespace": namespace}
        assert field_path in fields, f"the test model does not know fieldRef {field_path}"
        env[item["name"]] = fields[field_path]
    return env


def mount_volumes(
    statefulset: Doc,
    container: Doc,
    root: Path,
    *,
    config_maps: Mapping[str, Mapping[str, str]],
    secrets: Mapping[str, Mapping[str, bytes]],
) -> None:
    """Lay out every volume mount of `container` under `root` (the container's /)."""
    spec = statefulset["spec"]
    volumes = {v["name"]: v for v in spec["template"]["spec"].get("volumes", [])}
    claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
    for mount in container.get("volumeMounts", []):
        target = root / mount["mountPath"].lstrip("/")
        assert "subPath" not in mount, "the test model does not know subPath"
        if mount["name"] in claims:
            target.mkdir(parents=True, mode=0o700)
            continue
        volume = volumes[mount["name"]]
        target.mkdir(parents=True)
        for path, data, mode in _volume_files(volume, config_maps, secrets):
            file = target / path
            assert file.resolve().is_relative_to(target.resolve()), f"{path} escapes the mount"
            file.parent.mkdir(parents=True, exist_ok=True)
            assert not file.exists(), f"two sources write {path}"
            file.write_bytes(data)
            file.chmod(mode)


def _volume_files(
    volume: Doc,
    config_maps: Mapping[str, Mapping[str, str]],
    secrets: Mapping[str, Mapping[str, bytes]],
) -> Iterator[tuple[str, bytes, int]]:
    if "emptyDir" in volume:
        return
    if "configMap" in volume:
        source = volume["configMap"]
        data = {k: v.encode() for k, v in config_maps[source["name"]].items()}
        yield from _items(source, data, source.get("defaultMode", _DEFAULT_FILE_MODE))
    elif "secret" in volume:
        source = volume["secret"]
        data = dict(secrets[source["secretName"]])
        yield from _items(source, data, source.get("defaultMode", _DEFAULT_FILE_MODE))
    elif "projected" in volume:
        default_mode = volume["projected"].get("defaultMode", _DEFAULT_FILE_MODE)
        for entry in volume["projected"]["sources"]:
            if "configMap" in entry:
                source = entry["configMap"]
                data = {k: v.encode() for k, v in config_maps[source["name"]].items()}
            else:
                source = entry["secret"]
                data = dict(secrets[source["name"]])
            yield from _items(source, data, default_mode)
    else:
        raise AssertionError(f"the test model does not know volume {volume['name']}")


def _items(
    source: Mapping[str, Any], data: Mapping[str, bytes], default_mode: int
) -> Iterator[tuple[str, bytes, int]]:
    if "items" not in source:
        for key, value in data.items():
            yield key, value, default_mode
        return
    for item in source["items"]:
        assert item["key"] in data, f"{source.get('name')} has no key {item['key']}"
        yield item["path"], data[item["key"]], item.get("mode", default_mode)


def reroot(value: str, root: Path) -> str:
    """An absolute container path as seen from the test: `root` + path."""
    return str(root / value.lstrip("/")) if value.startswith("/") else value


def reroot_toml(text: str, root: Path) -> str:
    """Every absolute path in quoted TOML strings moved under `root`."""
    return re.sub(r'"(/[^"]*)"', lambda m: '"' + reroot(m.group(1), root) + '"', text)
