"""Build the container images and run the CPU one as a cluster would, on a machine with or without Docker.

    python tools/image.py build cpu|gpu|train     # make image / image-gpu / image-train
    python tools/image.py test                    # make image-test: build, start, compare with make run
    python tools/image.py test-gpu                # make image-test-gpu: build, check CUDA's libraries load

With a Docker engine it runs ``docker build``. Without one it builds with buildah (Debian's package,
installed when missing and we are root) and, when the default base (the official slim Python image)
cannot be pulled, on a Debian 12 base that mmdebstrap makes from Debian's packages (Python 3.11, as the
slim image). pip inside the build uses this machine's package index: its http(s) index settings go in
as a build secret, mounted for the install step only and never written into a layer.

Image names and tags are those the k8s overlays deploy (k8s/overlays/*/kustomization.yaml).
"""

from __future__ import annotations

import argparse
import configparser
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_DEFAULT = "python:3.11-slim-bookworm"
LOCAL_BASE = "localhost/aisight-base:bookworm"
CA_SECRET = "/run/secrets/pipca"  # where a RUN step with --mount=type=secret,id=pipca finds it
# What the slim Python image brings that a minbase Debian lacks (python -> python3, venv, TLS roots).
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"
# (Dockerfile, target or None, overlay that deploys it)
IMAGES = {
    "cpu": ("Dockerfile", None, "cpu"),
    "gpu": ("Dockerfile.gpu", "serve", "gpu"),
    "train": ("Dockerfile.gpu", "training", "training"),
}


def say(msg: str) -> None:
    print(f"image: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    say("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=True, **kw)


def image_ref(kind: str) -> str:
    """``name:tag`` of an image, as its overlay deploys it (the registry part left to the push)."""
    text = (ROOT / "k8s" / "overlays" / IMAGES[kind][2] / "kustomization.yaml").read_text()
    name = re.search(r"newName:\s*(\S+)", text).group(1).rsplit("/", 1)[-1]
    tag = re.search(r"newTag:\s*\"?([^\"\s]+)", text).group(1)
    return f"{name}:{tag}"


def docker_works() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True, timeout=30).returncode == 0


def ensure_debian_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"need {', '.join(missing)} (Debian packages) and cannot install them here")
    run(["apt-get", "update", "-qq"])
    run(["apt-get", "install", "-y", "-qq", *missing], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def pip_secret() -> tuple[Path, Path | None]:
    """A pip.conf with this machine's http(s) package index settings only (local paths mean nothing inside),
    and the CA bundle pip trusts here, if any: the two build secrets."""
    out = configparser.ConfigParser()
    out["global"] = {}
    cert = None
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    for line in listing.stdout.splitlines():
        key, _, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        value = value.strip().strip("'\"")
        if option in ("index-url", "extra-index-url", "trusted-host"):
            urls = [u for u in value.split() if not u.startswith("file:")]
            if urls:
                out["global"][option] = " ".join(urls)
        if option == "cert" and value:
            cert = value
    for env, option in (("PIP_INDEX_URL", "index-url"), ("PIP_EXTRA_INDEX_URL", "extra-index-url")):
        if os.environ.get(env):
            out["global"][option] = os.environ[env]
    cert = os.environ.get("PIP_CERT") or cert
    if cert and Path(cert).is_file():
        # The CA bundle this machine trusts (a TLS-inspecting proxy's CA, say) arrives as the pipca secret.
        out["global"]["cert"] = CA_SECRET
    fd, path = tempfile.mkstemp(prefix="aisight-pip-", suffix=".conf")
    with os.fdopen(fd, "w") as f:
        out.write(f)
    return Path(path), Path(cert) if cert and Path(cert).is_file() else None


def buildah_base() -> str:
    """The base image for buildah: the default slim image if it can be pulled, else a local Debian 12."""
    if os.environ.get("AISIGHT_BASE_IMAGE"):
        return os.environ["AISIGHT_BASE_IMAGE"]
    if subprocess.run(["buildah", "inspect", "--type", "image", LOCAL_BASE], capture_output=True).returncode == 0:
        return LOCAL_BASE
    try:
        pulled = subprocess.run(["buildah", "pull", "--quiet", BASE_DEFAULT], capture_output=True, timeout=60)
        if pulled.returncode == 0:
            return BASE_DEFAULT
    except subprocess.TimeoutExpired:
        pass
    say(f"{BASE_DEFAULT} cannot be pulled here: making {LOCAL_BASE} with mmdebstrap")
    ensure_debian_tools("mmdebstrap")
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "base.tar"
        run(["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(tar)])
        ctr = run(["buildah", "from", "scratch"], capture_output=True, text=True).stdout.strip()
        try:
            run(["buildah", "add", ctr, str(tar), "/"])
            run(["buildah", "config", "--env", "LANG=C.UTF-8", "--cmd", "python3", ctr])
            run(["buildah", "commit", "--quiet", ctr, LOCAL_BASE])
        finally:
            subprocess.run(["buildah", "rm", ctr], capture_output=True)
    return LOCAL_BASE


def build(kind: str) -> str:
    """Build one image; return its reference."""
    dockerfile, target, _ = IMAGES[kind]
    ref = image_ref(kind)
    secret, ca = pip_secret()
    empty = Path(tempfile.mkstemp(prefix="aisight-ca-")[1])
    t0 = time.monotonic()
    try:
        common = ["-f", dockerfile, "-t", ref, "--secret", f"id=pipconf,src={secret}",
                  "--secret", f"id=pipca,src={ca or empty}"]
        if target:
            common += ["--target", target]
        if docker_works():
            run(["docker", "build", *common, "."], cwd=ROOT, env={**os.environ, "DOCKER_BUILDKIT": "1"})
        else:
            ensure_debian_tools("buildah")
            base = buildah_base()
            run(["buildah", "bud", "--isolation", "chroot", "--layers", "--build-arg", f"PYTHON_IMAGE={base}",
                 *common, "."], cwd=ROOT)
    finally:
        secret.unlink(missing_ok=True)
        empty.unlink(missing_ok=True)
    say(f"built {ref} in {time.monotonic() - t0:.0f}s")
    return ref


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("build", "test", "test-gpu"))
    ap.add_argument("kind", nargs="?", default="cpu", choices=sorted(IMAGES))
    args = ap.parse_args()
    if args.command == "build":
        print(build(args.kind))
        return 0
    sys.path.insert(0, str(ROOT))
    from tools import image_test

    return image_test.test() if args.command == "test" else image_test.test_gpu()


if __name__ == "__main__":
    sys.exit(main())
