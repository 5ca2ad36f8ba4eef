# Every target sets up .venv idempotently first (re-installs only when the lock files change).
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.feedrec-installed

.PHONY: venv demo test lint format clean-run bench bench-report bench-train bench-ann bench-serve bench-spike bench-spike-policy bench-data bench-features bench-sink bench-signals

venv: $(STAMP)

$(STAMP): requirements/cpu.lock.txt requirements/cpu-nodeps.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/cpu.lock.txt
	$(PY) -m pip install -q --no-deps -r requirements/cpu-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The main job: the whole pipeline on the `small` preset, then feeds over HTTP, then shutdown.
demo: venv
	$(PY) -m jobs.demo --preset small --run-dir runs/demo

test: venv
	$(PY) -m pytest tests -q --durations=15 -n 1  # -n 1: see tests/conftest.py

# Training throughput, Ray Train DMP x2 vs one TorchRec process -> bench/results/train.json.
bench-train: venv
	$(PY) -m bench.train --preset small --run-dir runs/bench

# Feed RPS at p99 <= 100 ms: Ray Serve chain vs a one-process FastAPI twin, on the `posts_1m`
# world (1M posts eligible on the serving day; built once into runs/serve1m, about 7 min, and
# again when its feature tables are of an older layout than this code reads).
SERVE1M := runs/serve1m
bench-serve: venv
	( test -f $(SERVE1M)/models/retrieval/manifest.json && $(PY) -c \
	  'import sys, pathlib; from feedrec.data import PreprocessLayout as P; sys.exit(not P(pathlib.Path(sys.argv[1])).is_current())' \
	  $(SERVE1M)/data ) || ( \
	  .venv/bin/feedrec generate --preset posts_1m --run-dir $(SERVE1M) && \
	  .venv/bin/feedrec preprocess --run-dir $(SERVE1M) && \
	  .venv/bin/feedrec train all --run-dir $(SERVE1M) && \
	  .venv/bin/feedrec index --run-dir $(SERVE1M) )
	$(PY) -m bench.serve --run-dir $(SERVE1M)

# A 10x step in load for 60 s, below capacity (3 -> 30 req/s) and past it (6 -> 60): latency,
# shed requests and replicas over time -> bench/results/spike.png, spike_overload.png.
bench-spike: venv
	$(PY) -m bench.spike --run-dir runs/demo
	$(PY) -m bench.spike --run-dir runs/demo --base 6 --name spike_overload

# One 5 -> 50 req/s step under the cluster config's LatencyPolicy and under the laptop
# config (ongoing requests only), side by side -> spike_scaleup(.png), spike_scaleup_baseline.
bench-spike-policy: venv
	$(PY) -m bench.spike --run-dir runs/demo --base 5 --name spike_scaleup \
	  --serve-config apps/feed_service/serve_config.cluster.yaml
	$(PY) -m bench.spike --run-dir runs/demo --base 5 --name spike_scaleup_baseline

# faiss index sweep on 1M x 64 vs exact search -> the "ann" section of bench/results/serve.json.
bench-ann: venv
	$(PY) -m bench.ann --posts 1000000 --dim 64

# Preprocess rows/s, Ray Data vs the same transforms in one pyarrow process -> bench/results/data.json.
bench-data: venv
	$(PY) -m bench.data --preset small --run-dir runs/bench-data

# The online-feature work of a feed request, embedded store vs Redis (needs `make demo` and
# redis-server) -> bench/results/feature_store.json.
bench-features: venv
	$(PY) -m bench.feature_store --run-dir runs/demo

# The event sink's peak RSS on 10k and 40k open feeds, and its speed against a bare read of
# the bus -> bench/results/sink.json.
bench-sink: venv
	$(PY) -m bench.sink --feeds 10000 --scale 4

bench-signals: venv
	$(PY) -m bench.signals --feeds 20000 --scale 4

# Every benchmark, one after the other (never in parallel: they would share the cores they
# measure), then bench/REPORT.md. bench-spike and bench-features need `make demo` first.
bench: venv
	$(MAKE) bench-train
	$(MAKE) bench-ann
	$(MAKE) bench-serve
	$(MAKE) bench-spike
	$(MAKE) bench-spike-policy
	$(MAKE) bench-data
	$(MAKE) bench-features
	$(MAKE) bench-sink
	$(MAKE) bench-signals
	$(PY) -m bench.report

# bench/REPORT.md from the results already in bench/results (absent ones: "not run").
bench-report: venv
	$(PY) -m bench.report

lint: venv
	.venv/bin/ruff check libs apps jobs tests bench
	.venv/bin/ruff format --check libs apps jobs tests bench
	.venv/bin/mypy libs
