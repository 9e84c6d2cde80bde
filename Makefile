# Two commands matter: `make run` (set up, then serve) and `make test`
# (set up, then lint and run every test). Both work on a fresh machine with
# Python 3.11, a Rust toolchain and root access to apt (for chromium).

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.deps-stamp
NATIVE  := gateway/_native/lib_native.so
RUST_SRC := $(shell find native/src -name '*.rs') native/Cargo.toml Cargo.toml
LOADGEN := target/release/gw-loadgen
LOADGEN_SRC := $(shell find native/loadgen/src -name '*.rs') native/loadgen/Cargo.toml Cargo.toml

.PHONY: all setup native loadgen run test test-rust test-py lint fmt bench bench-crypto bench-forwarder bench-link bench-wire sysdeps clean

all: setup

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "maturin>=1.7,<2.0" "cffi>=1.17"
	$(BIN)/maturin develop --release --extras dev -q
	touch $@

$(NATIVE): $(STAMP) $(RUST_SRC)
	$(BIN)/maturin develop --release --extras dev -q
	touch $@

# The hot path's Python modules compiled with mypyc (gateway/compiled.py
# lists them; a tree without this build runs them as Python).
HOT_SRC := $(shell grep -o '^    "gateway[.a-z0-9_]*",' gateway/compiled.py | tr -d '", ' | sed 's|\.|/|g; s|$$|.py|')
COMPILED := $(VENV)/.compiled-stamp

$(COMPILED): $(STAMP) $(HOT_SRC) gateway/compiled.py gateway/buildcompiled.py pyproject.toml
	mkdir -p target
	GATEWAY_COMPILED=0 $(BIN)/python -m gateway.buildcompiled > target/mypyc-build.log 2>&1 || { cat target/mypyc-build.log; exit 1; }
	touch $@

native: $(NATIVE) $(COMPILED)

# The native engine of `gateway loadtest --engine native` (native/loadgen).
$(LOADGEN): $(LOADGEN_SRC)
	cargo build --release -q -p gw-loadgen
	touch $@

loadgen: $(LOADGEN)

setup: native loadgen

# System packages the tests use: headless Chromium (browser tests) and
# promtool from Debian's prometheus package (checks the /metrics output and the alerting rules in docs/prometheus).
sysdeps:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (Debian package) for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@command -v promtool >/dev/null 2>&1 || { \
	  echo "installing promtool (Debian package prometheus) for the metrics tests"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; }
	@command -v tcpdump >/dev/null 2>&1 || { \
	  echo "installing tcpdump (Debian package) for bench/hops.py"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tcpdump >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tcpdump >/dev/null; }; }
	@command -v perf >/dev/null 2>&1 || { \
	  echo "installing perf (Debian package linux-perf) for bench/pycalls.py --perf"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-perf >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-perf >/dev/null; }; }

run: setup
	$(BIN)/gateway serve $(ARGS)

lint: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --release -q -- -D warnings
	cargo clippy -p gateway-native --features cpython-fastpath --lib --release -q -- -D warnings
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/ruff check gateway tests bench
	$(BIN)/mypy

test-rust:
	cargo test --workspace --release -q

# The sans-IO and in-process tests of the compiled modules again on their
# sources (what runs where the build is missing or GATEWAY_COMPILED=0).
SOURCE_TESTS := tests/test_codec.py tests/test_codec_native.py tests/test_wsframe.py \
	tests/test_wsframe_native.py tests/test_h2data.py tests/test_link_core.py \
	tests/test_link_acks.py tests/test_session.py tests/test_recent.py tests/test_netio.py \
	tests/test_reactor.py tests/test_reactor_idle.py tests/test_downstream_proto.py \
	tests/test_downstream.py tests/test_server_ws.py tests/test_compiled.py tests/test_ratelimit.py \
	tests/test_protection.py

test-py: setup sysdeps
	$(BIN)/pytest -q tests
	GATEWAY_COMPILED=0 $(BIN)/pytest -q $(SOURCE_TESTS)

test: lint test-rust test-py

fmt: setup
	cargo fmt --all
	$(BIN)/ruff format gateway tests bench
	$(BIN)/ruff check --fix gateway tests bench

bench: bench-crypto bench-forwarder bench-link bench-wire

bench-crypto: setup
	$(BIN)/pytest bench/test_crypto_bench.py --benchmark-only --benchmark-columns=min,median,ops -q $(ARGS)

bench-forwarder: setup
	$(BIN)/pytest bench/test_forwarder_bench.py --benchmark-only --benchmark-columns=min,median,ops -q $(ARGS)

bench-link: setup
	$(BIN)/pytest bench/test_link_bench.py --benchmark-only --benchmark-columns=min,median,ops -q $(ARGS)

bench-wire: setup
	$(BIN)/pytest bench/test_wire_bench.py --benchmark-only --benchmark-columns=min,median,ops -q $(ARGS)

clean:
	rm -rf $(VENV) target gateway/_native .pytest_cache .mypy_cache .ruff_cache
	rm -f $(patsubst %.py,%.cpython-*.so,$(HOT_SRC)) gateway/hotpath__mypyc.*.so
