"""A reader of `deploy/Dockerfile`'s instructions, for tests that cannot run Docker.

Joins continuation lines, drops comments and splits each instruction into its
keyword and arguments; exec-form (JSON array) arguments are decoded. Only the
final build stage matters for what the image runs, so `final_stage` returns the
instructions after the last FROM. Standard library only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tests.deploy.kube import DEPLOY

DOCKERFILE = DEPLOY / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper-case: FROM, RUN, CMD ...
    arguments: str  # as written, continuations joined

    def exec_form(self) -> list[str]:
        """The arguments as a JSON array (exec form); fails on shell form."""
        text = self.arguments
        if self.keyword == "HEALTHCHECK":
            text = text[text.index("CMD") + len("CMD") :]
        value = json.loads(text)
        assert isinstance(value, list), f"{self.keyword} is not in exec form"
        assert all(isinstance(item, str) for item in value)
        return value


def instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """Every instruction of the Dockerfile at `path`, in order."""
    result: list[Instruction] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, arguments = text.partition(" ")
        result.append(Instruction(keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return result


def final_stage(path: Path = DOCKERFILE) -> list[Instruction]:
    """The instructions of the last build stage (from its FROM on)."""
    items = instructions(path)
    last_from = max(i for i, item in enumerate(items) if item.keyword == "FROM")
    return items[last_from:]


def last(stage: list[Instruction], keyword: str) -> Instruction:
    """The instruction that wins (the last one of `keyword`)."""
    found = [item for item in stage if item.keyword == keyword]
    assert found, f"no {keyword} in the final stage"
    return found[-1]
