"""Sequence the selection-grid Jobs inside the cluster.

    python grid_step.py wait JOB     # block until Job JOB is Complete or Failed
    python grid_step.py resume JOB   # set spec.suspend=false on Job JOB

Kubernetes has no "run B after A", so the rank Jobs use this to wait for a
stage's Indexed Job and then release the next (suspended) stage. Standard
library only: the training image has neither kubectl nor a Kubernetes client.
It authenticates with the pod's service-account token (RBAC in rbac.yaml).

Environment (tests set these; in a pod the defaults apply):
    GRID_SA_DIR        service-account mount (token, ca.crt, namespace)
    GRID_API_URL       API server URL; default from KUBERNETES_SERVICE_HOST/PORT
    GRID_POLL_SECONDS  poll interval while waiting (default 30)
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

SA_DIR = os.environ.get("GRID_SA_DIR", "/var/run/secrets/kubernetes.io/serviceaccount")
POLL_SECONDS = float(os.environ.get("GRID_POLL_SECONDS", "30"))
# Errors that retrying cannot fix: bad token, missing RBAC, no such Job.
FATAL_HTTP = {400, 401, 403, 404, 422}


def _read(name: str) -> str:
    with open(os.path.join(SA_DIR, name), encoding="utf-8") as f:
        return f.read().strip()


def _api_url() -> str:
    url = os.environ.get("GRID_API_URL")
    if url:
        return url.rstrip("/")
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"https://{host}:{port}"


def _call(method: str, name: str, body: dict | None = None) -> dict:
    """One API call on Job `name` in the pod's own namespace."""
    path = f"/apis/batch/v1/namespaces/{_read('namespace')}/jobs/{name}"
    # Re-read the token on every call: projected tokens are rotated by the
    # kubelet, and a wait can outlive the one read at start-up.
    headers = {"Authorization": f"Bearer {_read('token')}", "Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/merge-patch+json"
    request = urllib.request.Request(_api_url() + path, data=data, method=method, headers=headers)
    ca = os.path.join(SA_DIR, "ca.crt")
    context = ssl.create_default_context(cafile=ca) if os.path.exists(ca) else None
    with urllib.request.urlopen(request, timeout=30, context=context) as response:
        return json.load(response)


def terminal_state(job: dict) -> str | None:
    """'Complete' or 'Failed' once the Job has finished, else None."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return condition["type"]
    return None


def wait(name: str) -> int:
    """Poll until Job `name` finishes; 0 either way (rank what did finish)."""
    print(f"waiting for job/{name}", flush=True)
    while True:
        try:
            job = _call("GET", name)
        except urllib.error.HTTPError as e:
            if e.code in FATAL_HTTP:
                print(f"job/{name}: HTTP {e.code} {e.reason}", file=sys.stderr, flush=True)
                return 1
            print(f"job/{name}: HTTP {e.code}, retrying", file=sys.stderr, flush=True)
        except (urllib.error.URLError, OSError) as e:
            # A multi-hour wait must survive API-server restarts and blips.
            print(f"job/{name}: {e}, retrying", file=sys.stderr, flush=True)
        else:
            state = terminal_state(job)
            if state:
                status = job.get("status") or {}
                print(
                    f"job/{name} {state}: succeeded={status.get('succeeded', 0)} "
                    f"failed={status.get('failed', 0)} "
                    f"failedIndexes={status.get('failedIndexes', '') or '-'}",
                    flush=True,
                )
                return 0
        time.sleep(POLL_SECONDS)


def resume(name: str) -> int:
    """Unsuspend Job `name` so its pods start."""
    try:
        job = _call("PATCH", name, {"spec": {"suspend": False}})
    except urllib.error.HTTPError as e:
        print(f"job/{name}: HTTP {e.code} {e.reason}", file=sys.stderr, flush=True)
        return 1
    print(f"job/{name} resumed (suspend={job.get('spec', {}).get('suspend')})", flush=True)
    return 0


def main(argv: list[str]) -> int:
    commands = {"wait": wait, "resume": resume}
    if len(argv) != 2 or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
