"""Serve AI-Sight as ``make run`` and the container do: nginx in front of gunicorn, on one port.

``python -m aisight.serve`` writes an nginx config into a private runtime folder, starts gunicorn on a
unix socket there (only nginx can reach it) and nginx on HOST:PORT, and supervises both:

- SIGTERM: ``/readyz`` answers 503 at once, traffic keeps being served for AISIGHT_DRAIN_SECONDS, then
  nginx stops accepting and finishes what it holds, then gunicorn stops; exit 0.
- SIGINT (Ctrl-C): the same without the drain wait. SIGHUP: gunicorn replaces its workers.
- Either child dying ends the other and exits 1 (the container is restarted).

Settings (environment): HOST, PORT, WEB_CONCURRENCY (2), GUNICORN_THREADS (4), AISIGHT_QUEUE_MAX (4:
requests a worker holds beyond its threads), AISIGHT_RATE_LIMIT (10r/s per client on the POST endpoints,
``off``), AISIGHT_RATE_BURST (20), AISIGHT_TRUSTED_PROXIES (CIDRs whose X-Forwarded-For names the client),
AISIGHT_HEADER_TIMEOUT (10 s), AISIGHT_BODY_TIMEOUT (20 s), AISIGHT_DRAIN_SECONDS (0), AISIGHT_RUN_DIR
(default: a new temporary folder), AISIGHT_PROXY (``nginx``; ``off`` runs gunicorn alone on HOST:PORT).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aisight.limits import body_limit
from aisight.store import database_url, env_flag, store_enabled, upgrade

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).with_name("nginx.conf.in")
RATE = re.compile(r"^[1-9][0-9]*r/[sm]$")
# Above gunicorn's own worker timeout, so gunicorn (not nginx) decides when a request is stuck.
UPSTREAM_TIMEOUT = 130
# A graceful stop: nginx finishes the answers it is proxying within NGINX_GRACE seconds, then gunicorn
# (which holds nothing by then) within GUNICORN_GRACE; k8s' terminationGracePeriodSeconds covers both.
NGINX_GRACE = 20
GUNICORN_GRACE = 35


class ConfigError(ValueError):
    """A setting that cannot be served."""


def _int(env: Mapping[str, str], name: str, default: int, lowest: int = 0) -> int:
    raw = env.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError as exc:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from exc
    if value < lowest:
        raise ConfigError(f"{name} must be at least {lowest}, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    threads: int = 4
    queue: int = 4
    upload_mb: float = 20
    rate: str | None = "10r/s"
    burst: int = 20
    trusted_proxies: tuple[str, ...] = ()
    header_timeout: int = 10
    body_timeout: int = 20
    drain_seconds: float = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read the settings from ``env``; raise ConfigError with the variable's name when one is wrong."""
        rate = (env.get("AISIGHT_RATE_LIMIT") or "10r/s").strip().lower()
        if rate in ("off", "0", "false", "no", "none"):
            rate = None
        elif not RATE.match(rate):
            raise ConfigError(f"AISIGHT_RATE_LIMIT must look like 10r/s or 300r/m, or be off; got {rate!r}")
        proxies = tuple(p.strip() for p in (env.get("AISIGHT_TRUSTED_PROXIES") or "").split(",") if p.strip())
        for p in proxies:
            try:
                ipaddress.ip_network(p, strict=False)
            except ValueError as exc:
                raise ConfigError(f"AISIGHT_TRUSTED_PROXIES: {p!r} is not an address or CIDR") from exc
        try:
            upload_mb = float(env.get("AISIGHT_MAX_UPLOAD_MB") or 20)
            drain = float(env.get("AISIGHT_DRAIN_SECONDS") or 0)
        except ValueError as exc:
            raise ConfigError(f"AISIGHT_MAX_UPLOAD_MB and AISIGHT_DRAIN_SECONDS are numbers: {exc}") from exc
        return cls(
            host=(env.get("HOST") or "127.0.0.1").strip(),
            port=_int(env, "PORT", 8000, 1),
            workers=_int(env, "WEB_CONCURRENCY", 2, 1),
            threads=_int(env, "GUNICORN_THREADS", 4, 1),
            queue=_int(env, "AISIGHT_QUEUE_MAX", 4, 0),
            upload_mb=upload_mb,
            rate=rate,
            burst=_int(env, "AISIGHT_RATE_BURST", 20, 0),
            trusted_proxies=proxies,
            header_timeout=_int(env, "AISIGHT_HEADER_TIMEOUT", 10, 1),
            body_timeout=_int(env, "AISIGHT_BODY_TIMEOUT", 20, 1),
            drain_seconds=max(0.0, drain),
        )

    @property
    def admit(self) -> int:
        """Requests let into gunicorn at once: every worker's threads and its queue."""
        return self.workers * (self.threads + self.queue)


def render_nginx(s: Settings, run: Path, as_root: bool = False) -> str:
    """Return the nginx config for ``s`` with its files in ``run``."""
    listen = f"[{s.host}]:{s.port}" if ":" in s.host else f"{s.host}:{s.port}"
    real_ip = ""
    if s.trusted_proxies:
        real_ip = "".join(f"    set_real_ip_from {p};\n" for p in s.trusted_proxies)
        real_ip += "    real_ip_header X-Forwarded-For;\n    real_ip_recursive on;\n"
    limit = f"            limit_req zone=aisight_public burst={s.burst} nodelay;" if s.rate else ""
    values = {
        "RUN": str(run),
        "BODY_MAX": str(body_limit(s.upload_mb)),
        "UPLOAD_MB": f"{s.upload_mb:g}",
        "HEADER_TIMEOUT": str(s.header_timeout),
        "BODY_TIMEOUT": str(s.body_timeout),
        "UPSTREAM_TIMEOUT": str(UPSTREAM_TIMEOUT),
        "NGINX_GRACE": str(NGINX_GRACE),
        "REAL_IP": real_ip,
        "RATE": s.rate or "1r/s",  # the zone must parse even when no location uses it
        "ADMIT": str(s.admit),
        "LISTEN": listen,
        "LIMIT_REQ": limit,
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise ConfigError(f"unfilled placeholder in {TEMPLATE.name}: {text[text.index('{{'):][:40]}")
    if as_root:  # workers drop to nobody; the runtime folder is handed to that user below
        text = "user nobody nogroup;\n" + text
    return text


def find_nginx() -> str | None:
    """Return the nginx binary (PATH, then Debian's /usr/sbin), or None."""
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def gunicorn_command() -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "app:create_app()"]


def prepare_run_dir(path: str | None) -> Path:
    """Create the private runtime folder (socket, config, drain flag, nginx buffers)."""
    run = Path(path) if path else Path(tempfile.mkdtemp(prefix="aisight-run-"))
    run.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in ("draining", "gunicorn.sock", "nginx.pid"):
        (run / stale).unlink(missing_ok=True)
    if os.geteuid() == 0:
        import grp
        import pwd

        os.chown(run, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
    os.chmod(run, 0o700)
    return run


class Supervisor:
    """nginx + gunicorn as one service with one graceful stop."""

    def __init__(self, settings: Settings, nginx: str, run: Path, owned: bool) -> None:
        self.s, self.nginx, self.run, self.owned = settings, nginx, run, owned
        self.conf = run / "nginx.conf"
        self.gunicorn: subprocess.Popen | None = None
        self.proxy: subprocess.Popen | None = None
        self.stop_requested = threading.Event()
        self.drain = False

    def start(self) -> None:
        self.conf.write_text(render_nginx(self.s, self.run, as_root=os.geteuid() == 0))
        nginx = [self.nginx, "-c", str(self.conf), "-p", str(self.run), "-e", "stderr"]
        check = subprocess.run([*nginx, "-t", "-q"], capture_output=True, text=True)
        if check.returncode:
            raise ConfigError(f"nginx refused its config {self.conf}:\n{check.stderr.strip()}")
        env = {
            **os.environ,
            "AISIGHT_BIND": f"unix:{self.run}/gunicorn.sock",
            "WEB_CONCURRENCY": str(self.s.workers),
            "GUNICORN_THREADS": str(self.s.threads),
            "AISIGHT_QUEUE_MAX": str(self.s.queue),
            "AISIGHT_MODEL_LOAD": os.environ.get("AISIGHT_MODEL_LOAD") or "sync",
        }
        self.gunicorn = subprocess.Popen(gunicorn_command(), cwd=ROOT, env=env)
        self.proxy = subprocess.Popen(nginx)
        _say(f"nginx on http://{self.s.host}:{self.s.port} -> gunicorn {self.s.workers} workers x "
             f"{self.s.threads} threads (admits {self.s.admit}), rate limit {self.s.rate or 'off'}")

    def request_stop(self, drain: bool) -> None:
        self.drain = self.drain or drain
        self.stop_requested.set()

    def wait(self) -> int:
        """Run until a stop is asked for or a child dies; return the exit status."""
        assert self.gunicorn and self.proxy
        while not self.stop_requested.wait(0.5):
            for name, proc in (("gunicorn", self.gunicorn), ("nginx", self.proxy)):
                if proc.poll() is not None:
                    _say(f"{name} exited with {proc.returncode}: stopping")
                    self._stop_children()
                    return 1
        (self.run / "draining").touch()  # /readyz is 503 from now on
        if self.drain and self.s.drain_seconds:
            _say(f"draining: still serving for {self.s.drain_seconds:g}s while the load balancer lets go")
            time.sleep(self.s.drain_seconds)
        self._stop_children()
        return 0

    def _stop_children(self) -> None:
        # nginx first: it stops accepting and waits for the answers it is still proxying; then gunicorn.
        stops = ((self.proxy, signal.SIGQUIT, NGINX_GRACE + 5), (self.gunicorn, signal.SIGTERM, GUNICORN_GRACE))
        for proc, sig, grace in stops:
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(sig)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.owned:
            shutil.rmtree(self.run, ignore_errors=True)


def _say(message: str) -> None:
    print(f"aisight.serve: {message}", file=sys.stderr, flush=True)


def main() -> int:
    """Start nginx + gunicorn (or gunicorn alone where nginx is off or missing) and supervise them."""
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        _say(f"configuration error: {exc}")
        return 2
    if store_enabled() and env_flag("AISIGHT_DB_UPGRADE", True):
        # Once, before any worker starts (with nginx or without): two workers migrating at once would race.
        upgrade(database_url())
        os.environ["AISIGHT_DB_UPGRADE"] = "off"
    nginx = find_nginx()
    if (os.environ.get("AISIGHT_PROXY") or "nginx").strip().lower() == "off" or nginx is None:
        if nginx is None:
            _say("nginx not found: serving with gunicorn alone; slow clients can stall it "
                 "(install Debian's nginx-light, or run `make nginx`)")
        os.execv(sys.executable, gunicorn_command())
    sup = Supervisor(settings, nginx, prepare_run_dir(os.environ.get("AISIGHT_RUN_DIR")),
                     owned=not os.environ.get("AISIGHT_RUN_DIR"))
    signal.signal(signal.SIGTERM, lambda *_: sup.request_stop(drain=True))
    signal.signal(signal.SIGINT, lambda *_: sup.request_stop(drain=False))
    signal.signal(signal.SIGHUP, lambda *_: sup.gunicorn and sup.gunicorn.send_signal(signal.SIGHUP))
    try:
        sup.start()
    except (ConfigError, OSError) as exc:
        _say(str(exc))
        sup._stop_children()
        return 2
    return sup.wait()


if __name__ == "__main__":
    sys.exit(main())
