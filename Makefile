# AI-Sight: `make run` serves the bundled model, `make test` runs every test. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
DATA ?= ../shared/data/fundus-eye4
SHARED ?= ../shared/data
ALL_DATA ?= $(SHARED)/fundus-eye4,$(SHARED)/eyepacs-256,$(SHARED)/idrid-diaretdb1-dr
export PYTHONPATH := $(CURDIR)
# The bundled model; its OpenVINO IR (the CPU fast path) is made from model.keras here, not committed.
BUNDLED ?= models/2.0.0

.PHONY: run nginx postgres test test-all lint image image-gpu image-train image-test image-test-gpu model model-v2 evaluate report select bench bench-train venv venv-dev browser

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.runtime
venv-dev: $(VENV)/.dev

# nginx (buffering, timeouts, body cap, admission, rate limit) in front of gunicorn: aisight/serve.py.
# The clinicians' side is on (AISIGHT_STORE=on): a SQLite database and a session key under var/, both made
# on first start. AISIGHT_STORE=off make run serves the anonymous screening page and API alone.
run: $(VENV)/.runtime nginx var/secret_key $(BUNDLED)/model.xml
	HOST=$(HOST) PORT=$(PORT) AISIGHT_STORE=$${AISIGHT_STORE:-on} AISIGHT_SECRET_KEY_FILE=$(CURDIR)/var/secret_key \
	  $(PY) -m aisight.serve

$(BUNDLED)/model.xml: $(BUNDLED)/model.keras | $(VENV)/.runtime
	$(PY) -m training export-openvino --model $(BUNDLED)

var/secret_key:
	mkdir -p var && (umask 077 && $(PYTHON) -c "import secrets; print(secrets.token_hex(32))" > $@)

# Debian's PostgreSQL for the database tests (each runs on SQLite and on a real server the suite starts).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
	  || echo "postgresql not installed: the PostgreSQL half of the database tests will skip"; }

# Debian's nginx-light for the front proxy: installed when missing and we may (root + apt).
nginx:
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null) \
	  || echo "nginx not installed: the app will run on gunicorn alone"; }

# Chromium for the browser tests: installed from Debian when missing and we may (root + apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: browser tests will skip"; }

lint: $(VENV)/.dev
	$(PY) -m ruff check .

test: $(VENV)/.dev browser nginx postgres lint $(BUNDLED)/model.xml
	$(PY) -m pytest -q

# Slow tests too (longer training runs).
test-all: $(VENV)/.dev browser nginx postgres
	$(PY) -m pytest -q -m "slow or not slow"

# Retrain 1.0.0, the previous model (model/), with its committed config (about 1.5 h on 2 CPU cores).
model: $(VENV)/.runtime
	$(PY) -m training train --config configs/bundled.json --data $(DATA) --out model --run-dir runs/bundled

# The camera-invariant Xception on all three shared folders (about 10 min an epoch on 2 CPU cores, 30 epochs).
# Checkpointed every epoch: run it again after a stop and it continues. Lands in runs/, not in models/: it
# replaces the bundled model only once `make evaluate MODEL=runs/xception-v2/model` meets docs/model-v2.md §8.
model-v2: $(VENV)/.runtime
	$(PY) -m training train --config configs/xception-v2.json --data $(ALL_DATA) --out runs/xception-v2/model \
	  --run-dir runs/xception-v2/run --resume

# Per-task, per-source metrics of a model on held-out patients of all three folders.
MODEL ?= $(BUNDLED)
evaluate: $(VENV)/.runtime
	$(PY) -m training evaluate --model $(MODEL) --data $(ALL_DATA) --out runs/evaluate/$(subst /,-,$(MODEL))

# Report (Markdown + PNG plots) of the run that produced the bundled model.
report: $(VENV)/.runtime
	$(PY) -m training report --run runs/bundled --out runs/bundled/report

# The paper's full model selection (days on a CPU; see k8s/overlays/training for the cluster version).
select: $(VENV)/.runtime
	$(PY) -m training select --data $(DATA) --out runs/select --aug-healthy 3,1 --aug-diseased 2,1

bench: $(VENV)/.dev
	$(PY) bench/serve.py --model $(BUNDLED) --sizes mixed --levels 8 --requests 96

bench-train: $(VENV)/.dev
	$(PY) bench/train_throughput.py

# Container images (tools/image.py): docker build where an engine runs, else buildah on a Debian base
# made by mmdebstrap (both installed from Debian when missing). Names and tags: the k8s overlays'.
image: $(VENV)/.runtime
	$(PY) tools/image.py build cpu
image-gpu: $(VENV)/.runtime
	$(PY) tools/image.py build gpu
image-train: $(VENV)/.runtime
	$(PY) tools/image.py build train

# Build the CPU image, run its entrypoint as its user, compare its answers with make run's on real photos.
image-test: $(VENV)/.runtime nginx
	$(PY) tools/image.py test

# Build the GPU images and check that CUDA's libraries load in them (no GPU needed).
image-test-gpu: $(VENV)/.runtime
	$(PY) tools/image.py test-gpu
