#!/usr/bin/env bash
# Weft on a kind cluster: images, chart, a meshed two-tier app, a TrafficSplit and a
# TrafficTarget, then `weft explain`. Needs docker, kind (0.29+), kubectl and helm; run from
# anywhere. CLUSTER=weft, TAG=dev by default; `KEEP=1` keeps the cluster afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=${CLUSTER:-weft}
TAG=${TAG:-dev}
NODE_IMAGE=${NODE_IMAGE:-kindest/node:v1.33.1}
REGISTRY=ghcr.io/weft-mesh
step() { printf '\n==> %s\n' "$*"; }
for tool in docker kind kubectl helm cargo; do
  command -v "$tool" >/dev/null || { echo "error: $tool is not installed" >&2; exit 1; }
done
docker info >/dev/null 2>&1 || { echo "error: docker is installed but its daemon is not reachable" >&2; exit 1; }

step "cluster $CLUSTER ($NODE_IMAGE)"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --image "$NODE_IMAGE" --wait 120s
kubectl config use-context "kind-$CLUSTER"
[ "${KEEP:-0}" = 1 ] || trap 'kind delete cluster --name "$CLUSTER"' EXIT

step "images $REGISTRY/weft:$TAG and $REGISTRY/weft-proxy:$TAG, loaded into kind"
make images IMAGE_REGISTRY="$REGISTRY" IMAGE_TAG="$TAG"
kind load docker-image --name "$CLUSTER" "$REGISTRY/weft:$TAG" "$REGISTRY/weft-proxy:$TAG"
cargo build -q -p weft --bin weft   # the CLI on this machine: explain
weft=target/debug/weft

step "helm install weft helm/weft"
helm upgrade --install weft helm/weft -n weft-system --create-namespace \
  --set images.tag="$TAG" --wait --timeout 5m
kubectl -n weft-system get deploy,svc,pdb
kubectl get mutatingwebhookconfiguration weft-sidecar-injector \
  -o jsonpath='{.webhooks[0].clientConfig.caBundle}' | grep -q . \
  || { echo "error: no caBundle on weft-sidecar-injector (the controller patches it in)" >&2; exit 1; }

step "namespace shop, meshed"
kubectl create namespace shop --dry-run=client -o yaml | kubectl apply -f -
kubectl label namespace shop weft.dev/inject=enabled --overwrite
# The controller publishes weft-bootstrap and weft-root-ca into the labelled namespace.
for cm in weft-bootstrap weft-root-ca; do
  for _ in $(seq 30); do kubectl -n shop get configmap "$cm" >/dev/null 2>&1 && break; sleep 1; done
done

kubectl apply -f e2e/kind/shop.yaml
for d in frontend backend-v1 backend-v2; do kubectl -n shop rollout status "deploy/$d" --timeout 180s; done
kubectl -n shop get pods -o custom-columns='POD:.metadata.name,CONTAINERS:.spec.containers[*].name,SIDECAR:.spec.initContainers[*].name'

step "TrafficSplit 80/20 and TrafficTarget frontend -> backend"
kubectl apply -f e2e/kind/smi.yaml
kubectl -n shop wait --for=condition=Accepted trafficsplit/backend-rollout traffictarget/frontend-to-backend --timeout 60s
kubectl -n shop get trafficsplits,traffictargets -o custom-columns='KIND:.kind,NAME:.metadata.name,ACCEPTED:.status.conditions[?(@.type=="Accepted")].status,REASON:.status.conditions[?(@.type=="Accepted")].reason'

step "20 calls frontend -> backend (about 16 to v1, 4 to v2)"
kubectl -n shop exec deploy/frontend -c frontend -- sh -c \
  'for i in $(seq 20); do curl -s --max-time 5 http://backend:8080/hostname; echo; done' \
  | sed 's/-[a-z0-9]*-[a-z0-9]*$//' | sort | uniq -c

step "weft explain, through the controller's admin port"
frontend=$(kubectl -n shop get pod -l app=frontend -o jsonpath='{.items[0].metadata.name}')
kubectl -n weft-system port-forward deploy/weft-controller 15090:15090 >/dev/null &
forward=$!
trap 'kill $forward 2>/dev/null || true; [ "${KEEP:-0}" = 1 ] || kind delete cluster --name "$CLUSTER"' EXIT
for _ in $(seq 50); do curl -sf http://127.0.0.1:15090/healthz >/dev/null && break; sleep 0.2; done
"$weft" explain --admin-addr 127.0.0.1:15090 --from "shop/$frontend" http://backend:8080/
"$weft" explain --admin-addr 127.0.0.1:15090 --from "shop/$frontend" http://frontend:8080/ || true  # denied: no TrafficTarget
