"""Fixtures shared by every test: a real (small) model file, generated photos, the real data set."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# ../shared/data/fundus-eye4 beside the checkout; AISIGHT_DATA overrides it.
FUNDUS_DIR = Path(os.environ.get("AISIGHT_DATA", ROOT.parent / "shared" / "data" / "fundus-eye4"))
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A real Keras model file + card, trained in seconds on generated photos (TinyNet)."""
    from training.bootstrap import build_synthetic_model

    return build_synthetic_model(tmp_path_factory.mktemp("model"), arch="TinyNet")


@pytest.fixture(scope="session")
def fundus_dir() -> Path:
    """The real photos, or a skip that says where they were looked for."""
    if not (FUNDUS_DIR / "manifest.csv").is_file():
        pytest.skip(f"real fundus photos not found at {FUNDUS_DIR} (set AISIGHT_DATA to use another folder)")
    return FUNDUS_DIR


def fundus_jpeg(diseased: bool = False, size: int = 400, seed: int = 0, quality: int = 92) -> bytes:
    """A generated fundus-like photo as JPEG bytes."""
    from training.synthetic import make_fundus

    buf = io.BytesIO()
    make_fundus(np.random.default_rng(seed), diseased, size=size).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def run_at_once(call: Callable[[int], None], n: int, timeout: float | None = 30.0) -> None:
    """Run ``call(0)`` .. ``call(n - 1)`` in n threads released together.

    Waits up to ``timeout`` seconds for each thread (None: as long as it takes).
    """
    barrier = threading.Barrier(n)

    def target(i: int) -> None:
        barrier.wait()
        call(i)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


@pytest.fixture
def synthetic_jpeg() -> bytes:
    return fundus_jpeg()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests keep what a person may want to look at afterwards (screenshots)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server (Debian's package) in a temporary folder, on a unix socket only.

    Yields a function that makes a fresh, empty database and returns its SQLAlchemy URL.
    """
    import glob
    import shutil
    import subprocess
    import tempfile
    import uuid

    initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdbs:
        pytest.skip("PostgreSQL is not installed: `make postgres` installs Debian's package")
    bindir = Path(initdbs[-1]).parent
    base = Path(tempfile.mkdtemp(prefix="aisight-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(base, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = base / "data"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "aisight", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-o",
                    f"-k {base} -c listen_addresses='' -F", "start"], check=True, capture_output=True)

    def new_database() -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(host=str(base), user="aisight", dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://aisight@/{name}?host={base}"

    try:
        yield new_database
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """Every database test runs on SQLite and on a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'aisight.db'}"
    return request.getfixturevalue("postgres_server")()
