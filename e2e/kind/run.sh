#!/usr/bin/env bash
# End-to-end test of csi-async on a kind cluster.
#
#   e2e/kind/run.sh            (or: nox -s kind)
#
# 1. creates a kind cluster (a kind node is a privileged container, so it
#    sees the host's /dev/fuse; load the fuse module on the host first);
# 2. builds the driver image, the fusermount3 image and every example's FUSE
#    image with docker, and `kind load`s them;
# 3. installs the driver with `kubectl apply -k manifests/` and waits until
#    the DaemonSet is ready and kubelet lists the driver in the node's CSINode;
# 4. runs every example in a namespace that *enforces* Pod Security
#    "restricted", waits until the pod is Ready and checks that the bytes the
#    consumer container reads through the mount equal the expected content
#    (the example's ConfigMap), and that the FUSE mount exists on the node;
# 5. deletes one example pod and checks that nothing of it is left on the
#    node (no FUSE mount, no broker socket directory);
# 6. deletes the driver pod, waits for its replacement, and checks that every
#    remaining example still reads (mounts survive a driver restart), and
#    that a new pod mounts through the restarted driver;
# 7. deletes the remaining pods, checks that the restarted driver cleaned up
#    after them too;
# 8. with the sshfs example: `kubectl apply -k examples/sshfs-pv/` (static
#    PersistentVolumes), checks that both writer pods see each other's files
#    through their own mounts and that the ReadOnlyMany reader's mount is
#    read-only, deletes it all again, and checks that no FUSE mount is left
#    on the node (`docker exec <node> grep fuse /proc/self/mountinfo`).
#
# Needs: docker (with the default "docker" build driver, so that FROM can
# name a locally built image), kind, kubectl, and /dev/fuse on the host.
#
# Environment:
#   KIND_CLUSTER       cluster name (default csi-async-e2e)
#   KIND_NODE_IMAGE    kindest/node image to use (default: kind's own default)
#   E2E_EXAMPLES       space-separated example names (default: every
#                      self-contained example; ros3fs compiles the AWS SDK)
#   E2E_KEEP_CLUSTER   1: keep the cluster afterwards (default: delete it)
#   E2E_REUSE_CLUSTER  1: use an existing cluster of that name
#   E2E_SKIP_BUILD     1: do not build images (they must exist locally)
#   E2E_GCS_BUCKET, E2E_GCS_KEY_FILE [, E2E_GCS_EXPECT]
#                      run the gcsfuse example against a real bucket
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${KIND_CLUSTER:-csi-async-e2e}
NAMESPACE=csi-async-e2e
VERSION=0.1.0
REGISTRY=ghcr.io/csi-async
DRIVER_IMAGE=$REGISTRY/csi-async:$VERSION
FUSERMOUNT3_IMAGE=$REGISTRY/fusermount3:$VERSION
SELF_CONTAINED="sshfs s3fs rclone gocryptfs mountpoint-s3 goofys ros3fs meta-fuse-migration"
read -r -a EXAMPLES <<<"${E2E_EXAMPLES:-$SELF_CONTAINED}"
if [[ -n ${E2E_GCS_BUCKET:-} && -n ${E2E_GCS_KEY_FILE:-} ]]; then
  EXAMPLES+=(gcsfuse)
fi
WORK=$(mktemp -d)
NODE=""

log() { printf '\n=== %s\n' "$*" >&2; }
fail() {
  printf 'FAIL: %s\n' "$*" >&2
  exit 1
}

# ------------------------------------------------------------------ helpers

# The container that reads the FUSE volume in each example.
consumer_of() {
  case $1 in
    meta-fuse-migration) echo busybox ;;
    *) echo app ;;
  esac
}

pod_of() { echo "$1-example"; }

k() { kubectl --context "kind-$CLUSTER" "$@"; }
kn() { k --namespace "$NAMESPACE" "$@"; }

# FUSE mounts (fstype fuse or fuse.*; not fusectl) in the kind node's mount
# namespace, optionally only those whose line contains $1 (a pod uid).
node_fuse_mounts() {
  docker exec "$NODE" cat /proc/self/mountinfo \
    | grep -E ' - fuse(\.[^ ]*)? ' \
    | grep -F -- "${1:-}" || true
}

wait_until() { # wait_until SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@"; do
    ((SECONDS < deadline)) || fail "timed out waiting for $what"
    sleep 2
  done
}

on_exit() {
  local status=$?
  if ((status != 0)); then
    log "diagnostics (exit status $status)"
    k get pods -A -o wide >&2 || true
    kn describe pods >&2 || true
    k -n csi-async logs daemonset/csi-async-node -c csi-async --tail=200 >&2 || true
    k -n csi-async logs daemonset/csi-async-node -c node-driver-registrar --tail=50 >&2 || true
    [[ -n $NODE ]] && node_fuse_mounts >&2
  fi
  rm -rf "$WORK"
  if [[ ${E2E_KEEP_CLUSTER:-0} != 1 && ${E2E_REUSE_CLUSTER:-0} != 1 ]]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  exit "$status"
}

# ------------------------------------------------------------------ preconditions

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || fail "$tool is not installed"
done
[[ -c /dev/fuse ]] || fail "/dev/fuse is missing on this host (modprobe fuse)"
for example in "${EXAMPLES[@]}"; do
  [[ -f examples/$example/pod.yaml ]] || fail "no example named $example"
done
trap on_exit EXIT

# ------------------------------------------------------------------ cluster

if [[ ${E2E_REUSE_CLUSTER:-0} == 1 ]] && kind get clusters | grep -qx "$CLUSTER"; then
  log "using the existing kind cluster $CLUSTER"
else
  log "creating the kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --wait 120s ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
fi
NODE=$(kind get nodes --name "$CLUSTER" | head -n 1)
docker exec "$NODE" test -c /dev/fuse || fail "the kind node has no /dev/fuse"

# ------------------------------------------------------------------ images

images=("$DRIVER_IMAGE" "$FUSERMOUNT3_IMAGE")
for example in "${EXAMPLES[@]}"; do
  images+=("$REGISTRY/example-$example:$VERSION") # built from examples/<name>/Dockerfile
done

if [[ ${E2E_SKIP_BUILD:-0} != 1 ]]; then
  log "building the driver and fusermount3 images"
  docker build -f Containerfile -t "$DRIVER_IMAGE" .
  docker build -f Containerfile --target fusermount3 -t "$FUSERMOUNT3_IMAGE" .
  for example in "${EXAMPLES[@]}"; do
    log "building the $example example image"
    docker build --build-arg "FUSERMOUNT3_IMAGE=$FUSERMOUNT3_IMAGE" \
      -t "$REGISTRY/example-$example:$VERSION" "examples/$example"
  done
fi
log "loading ${#images[@]} images into the cluster"
kind load docker-image --name "$CLUSTER" "${images[@]}"

# ------------------------------------------------------------------ driver

log "installing the driver: kubectl apply -k manifests/"
k apply -k manifests/
k -n csi-async rollout status daemonset/csi-async-node --timeout=300s
driver_registered() {
  k get csinode "$NODE" -o jsonpath='{.spec.drivers[*].name}' 2>/dev/null \
    | tr ' ' '\n' | grep -qx fuse.csi-async.dev
}
wait_until 120 "kubelet to register fuse.csi-async.dev" driver_registered

# ------------------------------------------------------------------ examples

log "creating namespace $NAMESPACE with Pod Security 'restricted' enforced"
k create namespace "$NAMESPACE" --dry-run=client -o yaml | k apply -f -
k label --overwrite namespace "$NAMESPACE" \
  pod-security.kubernetes.io/enforce=restricted \
  pod-security.kubernetes.io/enforce-version=latest

if [[ " ${EXAMPLES[*]} " == *" gcsfuse "* ]]; then
  kn create secret generic gcsfuse-example-key --from-file=key.json="$E2E_GCS_KEY_FILE" \
    --dry-run=client -o yaml | kn apply -f -
fi

declare -A uid_of=()
for example in "${EXAMPLES[@]}"; do
  log "applying $example"
  if [[ $example == gcsfuse ]]; then
    sed "s|value: my-bucket .*|value: $E2E_GCS_BUCKET|" examples/gcsfuse/pod.yaml | kn apply -f -
  else
    kn apply -f "examples/$example/pod.yaml"
  fi
done

# Reads /data/hello.txt in the example's consumer container and compares it
# byte for byte with what the example put there.
check_reads() {
  local example=$1 pod consumer expected=$WORK/$1.expected actual=$WORK/$1.actual
  pod=$(pod_of "$example")
  consumer=$(consumer_of "$example")
  if [[ $example == gcsfuse ]]; then
    kn exec "$pod" -c "$consumer" -- ls /data >/dev/null || fail "$example: cannot list /data"
    [[ -n ${E2E_GCS_EXPECT:-} ]] || return 0
    printf '%s' "$E2E_GCS_EXPECT" >"$expected"
  else
    kn get configmap "$pod-content" -o jsonpath='{.data.hello\.txt}' >"$expected"
  fi
  kn exec "$pod" -c "$consumer" -- cat /data/hello.txt >"$actual" \
    || fail "$example: reading /data/hello.txt failed"
  cmp -s "$expected" "$actual" \
    || fail "$example: read $(od -c "$actual" | head -n 3), expected $(od -c "$expected" | head -n 3)"
  echo "$example: read $(wc -c <"$actual") bytes through the mount, as expected" >&2
}

for example in "${EXAMPLES[@]}"; do
  pod=$(pod_of "$example")
  log "waiting for $pod"
  kn wait --for=condition=Ready "pod/$pod" --timeout=600s
  uid_of[$example]=$(kn get pod "$pod" -o jsonpath='{.metadata.uid}')
  check_reads "$example"
  [[ -n $(node_fuse_mounts "${uid_of[$example]}") ]] \
    || fail "$example: no FUSE mount for pod ${uid_of[$example]} on the node"
  if [[ $example == gocryptfs ]]; then
    # The plaintext must only exist behind the mount, never in the cipher dir.
    if kn exec "$pod" -c gocryptfs -- grep -rqF "Hello from gocryptfs" /cipher; then
      fail "gocryptfs: plaintext found in the cipher directory"
    fi
  fi
done

# Deleting a pod must leave nothing of it on the node.
check_gone() {
  local example=$1 uid=${uid_of[$1]}
  [[ -z $(node_fuse_mounts "$uid") ]] \
    || fail "$example: FUSE mounts left on the node: $(node_fuse_mounts "$uid")"
  if docker exec "$NODE" test -e "/var/lib/csi-async/sockets/$uid"; then
    return 1
  fi
}

first=${EXAMPLES[0]}
log "deleting $first and checking the node is clean"
kn delete pod "$(pod_of "$first")" --wait=true --timeout=120s
wait_until 60 "$first's broker socket directory to go" check_gone "$first"
remaining=("${EXAMPLES[@]:1}")

if ((${#remaining[@]})); then
  log "restarting the driver: mounts must keep working"
  old_driver=$(k -n csi-async get pods -l app.kubernetes.io/name=csi-async \
    --field-selector "spec.nodeName=$NODE" -o name)
  k -n csi-async delete "$old_driver" --wait=true --timeout=120s
  k -n csi-async rollout status daemonset/csi-async-node --timeout=300s
  wait_until 120 "kubelet to register fuse.csi-async.dev again" driver_registered
  for example in "${remaining[@]}"; do
    check_reads "$example"
  done

  log "running $first again on the restarted driver"
  kn apply -f "examples/$first/pod.yaml"
  kn wait --for=condition=Ready "pod/$(pod_of "$first")" --timeout=600s
  uid_of[$first]=$(kn get pod "$(pod_of "$first")" -o jsonpath='{.metadata.uid}')
  check_reads "$first"
  remaining+=("$first")

  log "deleting the remaining examples"
  for example in "${remaining[@]}"; do
    kn delete pod "$(pod_of "$example")" --wait=true --timeout=120s
  done
  # The restarted driver restored these volumes from its state dir, so it
  # cleans them up like any other.
  for example in "${remaining[@]}"; do
    wait_until 60 "$example's broker socket directory to go" check_gone "$example"
  done
fi

if [[ " ${EXAMPLES[*]} " == *" sshfs "* ]]; then
  PV_NAMESPACE=sshfs-pv-example
  kp() { k --namespace "$PV_NAMESPACE" "$@"; }
  log "static PersistentVolumes: kubectl apply -k examples/sshfs-pv/"
  k apply -k examples/sshfs-pv/
  kp rollout status deployment/sftp-server --timeout=300s
  kp rollout status deployment/sshfs-pv-writer --timeout=600s
  kp wait --for=condition=Ready pod/sshfs-pv-reader --timeout=600s
  writers=$(kp get pods -l app.kubernetes.io/name=sshfs-pv-writer -o name)
  [[ $(wc -w <<<"$writers") == 2 ]] || fail "sshfs-pv: expected 2 writer pods, got: $writers"
  # Each writer wrote its own file through its own mount; each sees both.
  for writer in $writers; do
    for other in $writers; do
      kp exec "$writer" -c app -- cat "/data/written-by-${other#pod/}" >/dev/null \
        || fail "sshfs-pv: $writer does not see ${other#pod/}'s file"
    done
  done
  kp exec sshfs-pv-reader -c app -- cat /data/hello.txt >/dev/null \
    || fail "sshfs-pv: the reader cannot read /data/hello.txt"
  reader_uid=$(kp get pod sshfs-pv-reader -o jsonpath='{.metadata.uid}')
  node_fuse_mounts "$reader_uid" | grep -q "/sshfs-export-ro/mount ro," \
    || fail "sshfs-pv: the ReadOnlyMany mount is not read-only: $(node_fuse_mounts "$reader_uid")"
  pv_uids="$reader_uid $(kp get pods -l app.kubernetes.io/name=sshfs-pv-writer \
    -o jsonpath='{.items[*].metadata.uid}')"
  log "deleting the PersistentVolume example"
  k delete -k examples/sshfs-pv/ --wait=true --timeout=300s
  for uid in $pv_uids; do
    pv_mounts_gone() { [[ -z $(node_fuse_mounts "$uid") ]]; }
    wait_until 60 "the FUSE mounts of pod $uid to go" pv_mounts_gone
  done
fi

log "no FUSE mount may be left on the node"
left=$(node_fuse_mounts)
[[ -z $left ]] || fail "FUSE mounts left on the node:
$left"
log "PASS: ${EXAMPLES[*]}"
