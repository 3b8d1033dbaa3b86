"""Run the built images as a cluster would and check them (``make image-test``, ``make image-test-gpu``).

The CPU image: its own entrypoint as its own non-root user (``buildah run``: there is no engine here that
runs containers), then real photos posted to it and to ``make run``'s server from this checkout, whose
answers must be identical; and checks of what is baked in: the model and its card byte for byte, the user,
nothing writable by the app user outside its temp directories, no build secret left, the size.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tools.image import ROOT, build, docker_works, say

APP_UID = 10001
TEMP_DIRS = ("tmp", "var/tmp", "run/lock")
# Replaced by the container runtime at start (device nodes, kernel views): not the image's files.
RUNTIME_DIRS = ("proc", "sys", "dev")
SHARED = ROOT.parent / "shared" / "data"


def photos(n: int = 24) -> list[bytes]:
    """Real photos: half fundus-eye4 (healthy and diseased), half raw camera retinopathy; generated if absent."""
    picked: list[bytes] = []
    for folder, k in (("fundus-eye4", n // 2), ("idrid-diaretdb1-dr", n - n // 2)):
        manifest = SHARED / folder / "manifest.csv"
        if manifest.is_file():
            rows = list(csv.DictReader(manifest.open()))
            picked += [(SHARED / folder / r["path"]).read_bytes() for r in rows[:: max(1, len(rows) // k)][:k]]
    if len(picked) < n:
        import io

        import numpy as np

        from training.synthetic import make_fundus

        say(f"shared photos not found under {SHARED}: generated photos make up the rest")
        rng = np.random.default_rng(0)
        while len(picked) < n:
            buf = io.BytesIO()
            make_fundus(rng, diseased=bool(len(picked) % 2), size=400).save(buf, format="JPEG", quality=92)
            picked.append(buf.getvalue())
    return picked


def post(port: int, jpeg: bytes) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/api/v1/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    r = conn.getresponse()
    answer = json.loads(r.read())
    conn.close()
    return r.status, answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, name: str, timeout: float = 600) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode} before it was ready")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"{name} not ready after {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def writable_by_app(root: Path) -> list[str]:
    """Paths under ``root`` (the image's file system) the app user could write, outside the temp dirs."""
    found = []
    skip = {root / d for d in (*RUNTIME_DIRS, *TEMP_DIRS)}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in [*dirnames, *filenames]:
            p = here / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                continue
            mine = st.st_uid == APP_UID and st.st_mode & stat.S_IWUSR
            group = st.st_gid == APP_UID and st.st_mode & stat.S_IWGRP
            if mine or group or st.st_mode & stat.S_IWOTH:
                found.append("/" + str(p.relative_to(root)))
    return found


def static_checks(ref: str, mnt: Path, config: dict) -> list[str]:
    """What is baked in; returns the failures."""
    from aisight.artifact import DEFAULT_MODEL_DIR

    failures = []
    if config.get("User") != f"{APP_UID}:{APP_UID}":
        failures.append(f"image user is {config.get('User')!r}, not {APP_UID}:{APP_UID}")
    env = dict(e.split("=", 1) for e in config.get("Env", []))
    model_in_image = mnt / env.get("AISIGHT_MODEL_DIR", "/app/model").lstrip("/")
    tracked = ("model.keras", "model_card.json", "split_patients.json")  # the IR is converted in the image
    files = sorted(p for p in DEFAULT_MODEL_DIR.iterdir() if p.name in tracked)
    for f in files:
        baked = model_in_image / f.name
        if not baked.is_file() or sha(baked) != sha(f):
            failures.append(f"{baked} is not byte-equal to the repository's {f}")
    say(f"model files baked in and byte-equal: {[f.name for f in files]}")
    if not (model_in_image / "model.xml").is_file():
        failures.append("the image has no OpenVINO IR beside its model")
    writable = writable_by_app(mnt)
    if writable:
        failures.append(f"writable by the app user outside {TEMP_DIRS}: {writable[:10]}")
    for secret in ("etc/pip.conf", "root/.config/pip/pip.conf", "root/.pip/pip.conf"):
        if (mnt / secret).exists():
            failures.append(f"/{secret} was left in the image (the index must only be a build secret)")
    return failures


def test() -> int:
    """Build the CPU image, start it and ``make run``'s server, compare answers, check the image."""
    t_all = time.monotonic()
    ref = build("cpu")
    if docker_works():
        say("a Docker engine is here: run `docker run --rm --read-only --tmpfs /tmp -p 8000:8000 "
            f"{ref}` for the same checks by hand; this test drives buildah")
    inspect = json.loads(subprocess.run(["buildah", "inspect", "--type", "image", ref], capture_output=True,
                                        text=True, check=True).stdout)
    config = inspect["OCIv1"]["config"]
    size = subprocess.run(["buildah", "images", "--format", "{{.Size}}", ref], capture_output=True, text=True,
                          check=True).stdout.strip()
    ctr = subprocess.run(["buildah", "from", "--quiet", ref], capture_output=True, text=True, check=True).stdout.strip()
    image_srv = local_srv = None
    try:
        mnt = Path(subprocess.run(["buildah", "mount", ctr], capture_output=True, text=True, check=True).stdout.strip())
        failures = static_checks(ref, mnt, config)
        p_img, p_local = free_port(), free_port()
        common_env = {"HOST": "127.0.0.1", "AISIGHT_RATE_LIMIT": "off"}
        entrypoint = config["Entrypoint"]
        run_env = [a for k, v in {**common_env, "PORT": str(p_img)}.items() for a in ("--env", f"{k}={v}")]
        image_srv = subprocess.Popen(["buildah", "run", "--isolation", "chroot", "--user", f"{APP_UID}:{APP_UID}",
                                      *run_env, ctr, "--", *entrypoint], start_new_session=True)
        local_srv = subprocess.Popen([sys.executable, "-m", "aisight.serve"], cwd=ROOT, start_new_session=True,
                                     env={**os.environ, **common_env, "PORT": str(p_local), "PYTHONPATH": str(ROOT)})
        ready_img = wait_ready(p_img, image_srv, "the image's entrypoint")
        wait_ready(p_local, local_srv, "make run's server")
        same = 0
        pics = photos()
        for i, jpeg in enumerate(pics):
            a, b = post(p_img, jpeg), post(p_local, jpeg)
            if a == b and a[0] == 200:
                same += 1
            else:
                failures.append(f"photo {i}: image answered {a}, make run answered {b}")
        say(f"{same}/{len(pics)} answers identical (image ready in {ready_img:.0f}s as user {config.get('User')})")
    finally:
        for proc in (image_srv, local_srv):
            if proc is not None:
                stop(proc)
        subprocess.run(["buildah", "umount", ctr], capture_output=True)
        subprocess.run(["buildah", "rm", ctr], capture_output=True)
    say(f"{ref}: {size}; image-test took {time.monotonic() - t_all:.0f}s")
    for f in failures:
        say(f"FAILED: {f}")
    print("image-test: " + ("FAILED" if failures else "OK"))
    return 1 if failures else 0


GPU_CHECK = """
import ctypes, glob, os, sys
import tensorflow as tf
info = tf.sysconfig.get_build_info()
assert tf.test.is_built_with_cuda(), "TensorFlow without CUDA"
site = os.path.dirname(os.path.dirname(tf.__file__))
libs = {}
for name in ("libcudart.so.*", "libcublas.so.*", "libcudnn.so.*", "libcufft.so.*"):
    paths = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", name)))
    assert paths, f"{name} is not in the image"
    ctypes.CDLL(paths[0])  # loads without a GPU or a driver
    libs[name] = os.path.basename(paths[0])
print("tensorflow", tf.__version__, "cuda", info.get("cuda_version"), "cudnn", info.get("cudnn_version"), libs)
print("GPUs visible without a driver:", tf.config.list_physical_devices("GPU"))
import app, aisight.serve, training  # the serving and training code import in this image
"""


def test_gpu() -> int:
    """Build the GPU serving and training images; check their TensorFlow has CUDA and its libraries load."""
    t0 = time.monotonic()
    failures = 0
    for kind in ("gpu", "train"):
        ref = build(kind)
        ctr = subprocess.run(["buildah", "from", "--quiet", ref], capture_output=True, text=True,
                             check=True).stdout.strip()
        try:
            result = subprocess.run(["buildah", "run", "--isolation", "chroot", "--user", f"{APP_UID}:{APP_UID}",
                                     ctr, "--", "python", "-c", GPU_CHECK], capture_output=True, text=True)
        finally:
            subprocess.run(["buildah", "rm", ctr], capture_output=True)
        size = subprocess.run(["buildah", "images", "--format", "{{.Size}}", ref], capture_output=True,
                              text=True).stdout.strip()
        say(f"{ref} ({size}): {result.stdout.strip()}")
        if result.returncode:
            say(f"FAILED in {ref}:\n{result.stderr[-3000:]}")
        failures += result.returncode != 0
    say(f"image-test-gpu took {time.monotonic() - t0:.0f}s")
    print("image-test-gpu: " + ("FAILED" if failures else "OK"))
    return 1 if failures else 0
