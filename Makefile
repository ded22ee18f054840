# Shoal. `make run` starts a cluster on the embedded default config;
# `make test` runs every test (Go unit + race, end-to-end, JS compatibility).
GO      ?= go
BIN     := bin/shoal
GOBIN   := $(shell $(GO) env GOPATH)/bin
PKGS    := ./...
# Node packages for the compatibility tests live here, never globally.
COMPAT  := test/compat

.PHONY: all build run test lint fmt vet staticcheck unit compat compat-deps browser-deps reference-deps proto plugins bench gobench tidy clean

all: build

# A static binary (no cgo: Go's own DNS resolver and user lookup): it runs on
# any Linux without the build machine's libc, and the cluster's six processes
# do not each map libc and the dynamic loader (~11 MiB less summed RSS idle).
build:
	CGO_ENABLED=0 $(GO) build -o $(BIN) ./cmd/shoal

run: build
	./$(BIN) run

test: lint build unit compat

lint: fmt vet staticcheck

fmt:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet $(PKGS)

# staticcheck comes through the Go module proxy; skipped (with a note) if that fails.
staticcheck:
	@if [ ! -x $(GOBIN)/staticcheck ]; then $(GO) install honnef.co/go/tools/cmd/staticcheck@latest >/dev/null 2>&1 || true; fi
	@if [ -x $(GOBIN)/staticcheck ]; then $(GOBIN)/staticcheck $(PKGS); else echo "staticcheck: not installable, skipped"; fi

# Race detector on everything; end-to-end tests build the binary themselves.
# SHOAL_REFERENCE=1 makes the bench client's test against the official
# socketcluster-server (installed locally by reference-deps) mandatory.
unit: reference-deps
	SHOAL_REFERENCE=1 $(GO) test -race -count=1 -timeout 15m $(PKGS)

reference-deps:
	@cd test/reference && (npm ci --no-audit --no-fund --loglevel=error || npm install --no-audit --no-fund --loglevel=error)

compat-deps:
	@if [ -f $(COMPAT)/package.json ]; then \
		cd $(COMPAT) && (npm ci --no-audit --no-fund --loglevel=error || npm install --no-audit --no-fund --loglevel=error); fi

# Debian's chromium for the browser test of docs/connecting.md (headless); the
# test says it is skipped when chromium cannot be installed (not root, no apt).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing chromium (Debian) for the browser test"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium: install failed; the browser test will be skipped"; \
		else echo "chromium: not installed (needs root and apt-get); the browser test will be skipped"; fi; }

compat: build compat-deps browser-deps
	@if [ -f $(COMPAT)/package.json ]; then cd $(COMPAT) && SHOAL_BIN=$(CURDIR)/$(BIN) npm test; fi

proto:
	@command -v protoc >/dev/null || { echo "install protoc: apt-get install -y protobuf-compiler"; exit 1; }
	$(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@latest
	$(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@latest
	PATH=$(GOBIN):$$PATH protoc --go_out=. --go_opt=paths=source_relative \
		--go-grpc_out=. --go-grpc_opt=paths=source_relative \
		proto/control/controlpb/control.proto proto/middleware/middlewarepb/middleware.proto

# The example go-plugin middleware, at the path the example config names.
plugins:
	$(GO) build -o plugins/audit ./examples/audit-plugin

# Go benchmarks (smoke: one iteration each) — the measured figures come from bench-compare.
gobench:
	$(GO) test -run '^$$' -bench . -benchtime=1x -benchmem $(PKGS)

# Shoal against the official socketcluster-server in the same run; writes docs/benchmarks.md.
bench: build reference-deps
	scripts/bench.sh $(BIN)

tidy:
	$(GO) mod tidy
	git diff --exit-code go.mod go.sum

clean:
	rm -rf bin data plugins
