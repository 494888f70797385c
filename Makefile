# The two commands a newcomer needs:
#   make demo   the whole pipeline locally: ingest on embedded SQLite + an agent with simulated sensors
#   make test   every test (installs the Debian packages it needs first)
SHELL := /bin/bash
SWIFT ?= swift
DEMO_SECONDS ?= 40

.PHONY: demo test deps build release bench clean install install-ingest deb

deps:
	@.ci/install-deps

build: deps
	$(SWIFT) build

release: deps
	$(SWIFT) build -c release

demo: build
	@DEMO_SECONDS=$(DEMO_SECONDS) examples/demo.sh

# Suites that assert wall-clock timing (sampling intervals, backoff gaps, timeouts, live-first delivery) run in a second
# pass, the end-to-end suites (real processes) in a third of their own so that fewer timed suites share two cores at once:
# on a two-core machine the CPU-bound suites (codec properties, ingest) would otherwise hold both threads of the
# concurrency pool and delay their timers. Last, each suite that must have the test process to itself runs alone:
# HostileConnectionsTests holds 2,000 sockets open, which pushes every descriptor another suite opens past the 1024 that
# select(2), and so libmodbus, can watch; SamplerTests counts reads per interval to within a tick, which the many
# simulator and end-to-end suites of the timed pass disturb on two cores; PostgresEndToEndTests and NginxEndToEndTests
# restart the shared PostgreSQL cluster, and PostgresOutageTests stops it for seconds, which would cut every other
# suite's connections (and each other's);
# IngestTLSTests runs TLS handshakes and HTTP/2 servers whose CPU delays the timed suites' backoff gaps;
# PostgresTLSStoreTests' handshakes with PostgreSQL took more than 5 s beside the first pass's CPU-bound suites, and once
# its test never ended there (alone it takes two seconds).
# SQLiteRetentionBesideServeTests bounds an upload's wait beside a retention run of another store (under 1 s). Every pass
# always runs; the target fails if any does, and then ends with a summary of what failed (.ci/test-passes).
TIMED_SUITES := UploadClockTests|IngestSystemdNotifierTests|UploadPipelineTests|SamplerStoppedAgentTests|PostgresTLSStoreTests|SQLiteRetentionBesideServeTests|UploadHostileAnswerTests|PostgresEndToEndTests|PostgresOutageTests|PartitionMaintenanceTests|NginxEndToEndTests|LatestAcrossInstancesTests|PgBouncerTests|SamplerTests|SamplerStuckDriverTests|WatchdogTests|ScanTests|MissingDeviceTests|ConnectionLimitTests|EZODriverTests|EZOSimulatorTests|ModbusBusTests|DS18B20DriverTests|GPIODriverTests|GPIOStreamingTests|GPIOReadTimingTests|GPIOAgentTests|DriverExamplesTests|HardwareAgentTests|CalibrationAgentTests|UploadCalibrationTests|CalibrationDeliveryTests|ControlSocketTests|UploadUploaderTests|UploadRefusalTests|UploadSequenceTests|UploadHTTPClientTests|EndToEndTests|UploadDeviceCheckTests|MixedSiteEndToEndTests|SiteEnrollmentTests|NotificationDeliveryTests|NotificationOutboxTests|SMTPDeliveryTests|WebhookExchangeTests|NotificationCrashTests|ConfigurationReloadTests|StatefulDeliveryTests|IngestTLSTests
SOLO_SUITES := HostileConnectionsTests|SamplerTests|PostgresEndToEndTests|PostgresOutageTests|NginxEndToEndTests|IngestTLSTests|PostgresTLSStoreTests

# The build and each pass write their output to .build/test-logs/ (a file: a stalled reader of a pipe would block the
# test process); what is printed is short (.ci/test-passes).
# All passes run beside one throwaway PostgreSQL cluster (.ci/with-postgres: initdb in a temporary directory, a Unix
# socket, stopped and removed afterwards); PostgreSQL tests fail, never skip, without it.
test: deps
	@mkdir -p .build/test-logs && echo "=== make test: building the tests (minutes; output in .build/test-logs/build.log)"
	@$(SWIFT) build --build-tests >.build/test-logs/build.log 2>&1 || { grep -aE 'error:' .build/test-logs/build.log | head -n 40; tail -n 20 .build/test-logs/build.log; exit 1; }
	@grep -aE ': warning:' .build/test-logs/build.log | sort -u | head -n 20 || true
	@SWIFT="$(SWIFT)" TIMED_SUITES="$(TIMED_SUITES)" SOLO_SUITES="$(SOLO_SUITES)" .ci/with-postgres .ci/test-passes

# Installing the site agent (see README "Operations", Install (site)). `make install` (PREFIX=/usr/local, DESTDIR,
# SYSCONFDIR=/etc and SYSTEMD_UNIT_DIR honoured; a PREFIX or SYSCONFDIR with whitespace, which would split the unit's
# ExecStart=, is refused before the build, see install-lib.sh check_unit_paths; the unit goes where systemd reads it
# whatever PREFIX, see install-lib.sh unit_dir) builds the release binary (carrying the Swift runtime, like the
# package's: it keeps running when the toolchain changes, and is 6 MB smaller in memory than one linked to the
# toolchain's libraries) and lays out the binary, the systemd unit, the example configuration (never overwriting one), a
# udev rule for GPIO and the docs; as root without DESTDIR it also creates the user farmgate (groups dialout, gpio).
# `make deb` builds farmgate_<version>_<arch>.deb from the same layout (PREFIX=/usr) with a binary that carries the Swift
# runtime (--static-swift-stdlib), for `apt install ./farmgate_*.deb` on the Pi. FARMGATE_BIN=path skips the build.
# The site binary is built in .build/site with each function in its own section and linked by lld in the order of
# Sources/farmgate/farmgate.order (the functions `farmgate agent` runs, from Tests/tools/site-order-file.sh): the code
# the agent runs then sits together and the kernel maps fewer pages of the binary (README "Benchmarks", Site
# footprint). Relative relocations are packed (DT_RELR, glibc 2.36 or later: Debian 12, Raspberry Pi OS bookworm): the
# loader no longer reads a megabyte of them at every start. The binary exports no symbols (--no-export-dynamic, after
# the toolchain's -export-dynamic for --static-swift-stdlib): nothing looks a symbol of it up by name, and the loader
# searched its 10,900 exported names for every symbol the shared libraries bind (about 0.9 MB of them resident).
# SwiftPM does not relink when only the order file changes: SITE_RELINK removes a binary older than it.
SITE_BUILD := $(SWIFT) build -c release --product farmgate --scratch-path .build/site \
	-Xswiftc -Xfrontend -Xswiftc -function-sections -Xswiftc -use-ld=lld \
	-Xlinker --symbol-ordering-file=$(CURDIR)/Sources/farmgate/farmgate.order -Xlinker --no-warn-symbol-ordering \
	-Xlinker -z -Xlinker pack-relative-relocs -Xlinker --no-export-dynamic
SITE_RELINK = { bin="$$($(SITE_BUILD) --static-swift-stdlib --show-bin-path)/farmgate" && \
	if [ -e "$$bin" ] && [ Sources/farmgate/farmgate.order -nt "$$bin" ]; then rm -f "$$bin"; fi; }
PREFIX ?= /usr/local
DESTDIR ?=
FARMGATE_BIN ?=

# Refuses, before any build, a PREFIX or SYSCONFDIR the unit's ExecStart= cannot hold (the install scripts check again).
CHECK_UNIT_PATHS = @PREFIX="$(PREFIX)" SYSCONFDIR="$(SYSCONFDIR)" bash -c '. systemd/install/install-lib.sh && check_unit_paths $@'

install:
	$(CHECK_UNIT_PATHS)
	@if [ -z "$(FARMGATE_BIN)" ]; then .ci/install-deps && $(SITE_RELINK) && $(SITE_BUILD) --static-swift-stdlib; fi
	@FARMGATE_BIN="$(or $(FARMGATE_BIN),$$($(SITE_BUILD) --static-swift-stdlib --show-bin-path)/farmgate)" PREFIX="$(PREFIX)" DESTDIR="$(DESTDIR)" \
		SYSCONFDIR="$(SYSCONFDIR)" SYSTEMD_UNIT_DIR="$(SYSTEMD_UNIT_DIR)" systemd/install/install-site.sh

# Installing the ingest on a server (see README "Operations", Install (ingest)): `make install-ingest` (PREFIX, DESTDIR,
# SYSCONFDIR honoured; whitespace in PREFIX or SYSCONFDIR refused, as for install) builds the release binary and lays
# out the binary, the systemd unit, a configuration (never overwriting one) and the docs; as root without DESTDIR it
# also creates the user farmgate-ingest. FARMGATE_INGEST_BIN=path skips the build.
FARMGATE_INGEST_BIN ?=

install-ingest:
	$(CHECK_UNIT_PATHS)
	@if [ -z "$(FARMGATE_INGEST_BIN)" ]; then .ci/install-deps && $(SWIFT) build -c release --product farmgate-ingest; fi
	@FARMGATE_INGEST_BIN="$(or $(FARMGATE_INGEST_BIN),$$($(SWIFT) build -c release --show-bin-path)/farmgate-ingest)" PREFIX="$(PREFIX)" \
		DESTDIR="$(DESTDIR)" SYSCONFDIR="$(SYSCONFDIR)" SYSTEMD_UNIT_DIR="$(SYSTEMD_UNIT_DIR)" systemd/install/install-ingest.sh

deb:
	@if [ -z "$(FARMGATE_BIN)" ]; then .ci/install-deps && $(SITE_RELINK) && $(SITE_BUILD) --static-swift-stdlib; fi
	@FARMGATE_BIN="$(or $(FARMGATE_BIN),$$($(SITE_BUILD) --static-swift-stdlib --show-bin-path)/farmgate)" systemd/install/build-deb.sh

bench: release
	$(SWIFT) run -c release farmgate-bench all

clean:
	rm -rf .build demo-data
