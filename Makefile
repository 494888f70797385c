# The two commands a newcomer needs:
#   make demo   the whole pipeline locally: ingest on embedded SQLite + an agent with simulated sensors
#   make test   every test (installs the Debian packages it needs first)
SHELL := /bin/bash
SWIFT ?= swift
DEMO_SECONDS ?= 40

.PHONY: demo test deps build release bench clean

deps:
	@.ci/install-deps

build: deps
	$(SWIFT) build

release: deps
	$(SWIFT) build -c release

demo: build
	@DEMO_SECONDS=$(DEMO_SECONDS) examples/demo.sh

test: deps
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build

bench: release
	$(SWIFT) run -c release farmgate-bench all

clean:
	rm -rf .build demo-data
