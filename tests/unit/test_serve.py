"""The front proxy's settings and config (aisight.serve): real nginx checks what is rendered."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from aisight.limits import body_limit
from aisight.serve import ConfigError, Settings, find_nginx, render_nginx


def test_defaults():
    s = Settings.from_env({})
    assert (s.host, s.port, s.workers, s.threads, s.queue) == ("127.0.0.1", 8000, 2, 4, 4)
    assert s.admit == 16 and s.rate == "10r/s" and s.drain_seconds == 0


@pytest.mark.parametrize("env, word", [
    ({"AISIGHT_RATE_LIMIT": "lots"}, "AISIGHT_RATE_LIMIT"),
    ({"AISIGHT_TRUSTED_PROXIES": "10.0.0.0/8,not-an-ip"}, "AISIGHT_TRUSTED_PROXIES"),
    ({"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY"),
    ({"PORT": "eighty"}, "PORT"),
    ({"AISIGHT_DRAIN_SECONDS": "soon"}, "AISIGHT_DRAIN_SECONDS"),
])
def test_bad_settings_name_the_variable(env, word):
    with pytest.raises(ConfigError, match=word):
        Settings.from_env(env)


def test_rendered_config_carries_the_settings(tmp_path):
    s = Settings.from_env({"HOST": "0.0.0.0", "PORT": "9000", "AISIGHT_MAX_UPLOAD_MB": "5", "WEB_CONCURRENCY": "3",
                           "GUNICORN_THREADS": "2", "AISIGHT_QUEUE_MAX": "1", "AISIGHT_RATE_LIMIT": "30r/m",
                           "AISIGHT_TRUSTED_PROXIES": "130.211.0.0/22, 35.191.0.0/16"})
    text = render_nginx(s, tmp_path)
    assert "listen 0.0.0.0:9000 " in text
    assert f"client_max_body_size {body_limit(5)};" in text  # the same bytes as the app's own 413
    assert f"client_body_buffer_size {body_limit(5)};" in text  # bodies stay in memory, never on disk
    assert "max_conns=9;" in text  # 3 workers x (2 threads + 1 queued)
    assert "rate=30r/m" in text and text.count("limit_req zone=aisight_public") == 2
    assert "set_real_ip_from 130.211.0.0/22;" in text and "set_real_ip_from 35.191.0.0/16;" in text
    assert "{{" not in text
    off = render_nginx(Settings.from_env({"AISIGHT_RATE_LIMIT": "off"}), tmp_path)
    assert "limit_req zone=" not in off and "set_real_ip_from" not in off


def test_ipv6_listen(tmp_path):
    assert "listen [::1]:8000 " in render_nginx(Settings.from_env({"HOST": "::1"}), tmp_path)


@pytest.mark.skipif(find_nginx() is None, reason="nginx not installed: run `make nginx` (Debian's nginx-light)")
@pytest.mark.parametrize("env", [{}, {"AISIGHT_RATE_LIMIT": "off", "AISIGHT_TRUSTED_PROXIES": "10.0.0.0/8"}])
def test_nginx_accepts_the_rendered_config(tmp_path, env):
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx(Settings.from_env(env), tmp_path))
    check = subprocess.run([find_nginx(), "-t", "-c", str(conf), "-p", str(tmp_path), "-e", "stderr"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_bad_settings_stop_the_server_with_a_message():
    import os
    import sys

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "aisight.serve"], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(root), "AISIGHT_RATE_LIMIT": "fast"}, timeout=60)
    assert result.returncode == 2 and "AISIGHT_RATE_LIMIT" in result.stderr
