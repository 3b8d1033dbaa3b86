"""tools/image.py: the names it builds are the ones k8s deploys; the build secret holds no local paths."""

from __future__ import annotations

import configparser
import re

from tools.image import IMAGES, ROOT, image_ref, pip_secret


def test_image_names_and_tags_are_the_overlays():
    for kind, (_, _, overlay) in IMAGES.items():
        text = (ROOT / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text()
        name = re.search(r"newName:\s*(\S+)", text).group(1).rsplit("/", 1)[-1]
        tag = re.search(r"newTag:\s*\"?([^\"\s]+)", text).group(1)
        assert image_ref(kind) == f"{name}:{tag}"
    assert image_ref("cpu").startswith("aisight:") and image_ref("gpu").startswith("aisight-gpu:")


def test_pip_secret_keeps_http_indexes_and_drops_local_paths(monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "https://extra.example/simple")
    path, ca = pip_secret()
    try:
        cfg = configparser.ConfigParser()
        cfg.read(path)
        assert cfg["global"]["index-url"] == "https://mirror.example/simple"
        assert cfg["global"]["extra-index-url"] == "https://extra.example/simple"
        text = path.read_text()
        assert "file:" not in text and "find-links" not in text and "constraint" not in text
        if ca is not None:  # the bundle goes in as its own secret; the config names where it is mounted
            assert cfg["global"]["cert"] == "/run/secrets/pipca" and ca.is_file()
    finally:
        path.unlink()


def test_writable_scan_finds_what_the_app_user_could_change(tmp_path):
    import os

    from tools.image_test import APP_UID, writable_by_app

    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "code.py").write_text("x")
    (tmp_path / "app" / "code.py").chmod(0o644)
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "scratch").write_text("x")
    (tmp_path / "tmp" / "scratch").chmod(0o666)  # the temp dir may be writable
    assert writable_by_app(tmp_path) == []
    (tmp_path / "app" / "open.txt").write_text("x")
    (tmp_path / "app" / "open.txt").chmod(0o666)
    mine = tmp_path / "app" / "mine.txt"
    mine.write_text("x")
    os.chown(mine, APP_UID, 0) if os.geteuid() == 0 else None
    found = writable_by_app(tmp_path)
    assert "/app/open.txt" in found
    if os.geteuid() == 0:
        assert "/app/mine.txt" in found
