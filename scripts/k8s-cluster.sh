#!/usr/bin/env bash
# A real single-node Kubernetes on loopback, for the tests: `scripts/k8s-cluster.sh up|down|status|env|build`.
#
# Kubernetes 1.20 built from Debian's `kubernetes` source package (the only Kubernetes the package
# mirror offers; its tarball vendors every Go dependency, so it builds offline with Debian's Go),
# etcd from etcd-server, containerd + runc, and an isolated pod bridge (no gateway, no masquerade:
# nothing leaves the machine). No kube-proxy, no cluster DNS, no storage provisioner (the tests
# provide local PersistentVolumes). As root; no systemd: every daemon is started here, its output in
# $LOG, and stopped by `down` by its process id, which also puts back every host setting it changed.
#
#   K8S_CACHE   built binaries and the pause image, kept between runs (default /var/cache/gpt2-k8s)
#   kubeconfig  $STATE/admin.kubeconfig (printed by `up`); kubectl: $K8S_CACHE/bin/kubectl;
#               `eval "$(scripts/k8s-cluster.sh env)"` sets KUBECONFIG, KUBECTL and CONTAINERD_ADDRESS
set -euo pipefail

CACHE=${K8S_CACHE:-/var/cache/gpt2-k8s}
STATE=/var/lib/gpt2-k8s
RUN=/run/gpt2-k8s
LOG=/var/log/gpt2-k8s
BIN=$CACHE/bin
NODE=$(hostname)
SOCK=$RUN/containerd/containerd.sock
BRIDGE=gpt2br0
POD_SUBNET=10.244.0.0/24
SERVICE_RANGE=10.96.0.0/16
PAUSE_IMAGE=localhost/gpt2-pause:3.4
KUBE_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
PKGS=(etcd-server containerd runc containernetworking-plugins golang-go golang-github-modern-go-reflect2-dev
      dpkg-dev make gcc libc6-dev openssl curl buildah iproute2)
# the kubelet sets these at start and 1.20 cannot be told not to: saved by `up`, put back by `down`
SYSCTLS=(vm.overcommit_memory kernel.panic kernel.panic_on_oops)

say() { echo "[k8s-cluster] $*"; }
die() { echo "[k8s-cluster] error: $*" >&2; exit 1; }

install() {
    local missing=()
    for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if ((${#missing[@]})); then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# ---- build (once; cached) ---------------------------------------------------------------------------

source_tree() {  # Debian's kubernetes source package, unpacked with Debian's patches, into $CACHE/src/k8s
    local apt="$CACHE/apt" src="$CACHE/src"
    rm -rf "$apt" "$src" && mkdir -p "$apt/parts" "$apt/lists/partial" "$apt/cache/archives/partial" "$src"
    # a deb-src twin of the system's own Debian sources, used by this apt call only
    local sources
    sources=$(ls /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$sources" ] || die "no /etc/apt/sources.list.d/debian.sources to derive a deb-src entry from"
    sed 's/^Types: deb$/Types: deb-src/' "$sources" >"$apt/parts/debian-src.sources"
    local opts=(-o Dir::Etc::SourceParts="$apt/parts" -o Dir::Etc::SourceList=/dev/null
                -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache" -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" update -qq
    (cd "$src" && apt-get "${opts[@]}" source --download-only -qq kubernetes >/dev/null)
    (cd "$src" && dpkg-source -x ./*.dsc k8s >/dev/null)
    # 1.20 vendors reflect2 1.0.1, whose map iteration predates Go 1.18: built with Debian's Go the
    # apiserver segfaults on the first custom resource. Debian's reflect2 1.0.2 carries the fix.
    local vendored="$src/k8s/vendor/github.com/modern-go/reflect2"
    rm -rf "$vendored" && mkdir -p "$vendored"
    cp -r /usr/share/gocode/src/github.com/modern-go/reflect2/. "$vendored/"
    rm -f "$vendored/go.mod"
}

build() {
    local b missing=0
    for b in "${KUBE_BINARIES[@]}"; do [ -x "$BIN/$b" ] || missing=1; done
    if ((missing)); then
        say "building Kubernetes from Debian's source package (about 6 minutes on 2 cores, once)"
        source_tree
        (cd "$CACHE/src/k8s" && CGO_ENABLED=0 GOFLAGS=-mod=vendor GOPROXY=off GOCACHE="$CACHE/gocache" \
            make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kubectl" \
            >"$CACHE/build.log" 2>&1) || { tail -30 "$CACHE/build.log" >&2; die "the build failed: $CACHE/build.log"; }
        mkdir -p "$BIN"
        for b in "${KUBE_BINARIES[@]}"; do cp "$CACHE/src/k8s/_output/local/bin/linux/amd64/$b" "$BIN/"; done
        # the pause program of the same tree, for the pod sandbox image (no registry to pull one from)
        gcc -Os -static -o "$BIN/pause" "$CACHE/src/k8s/build/pause/linux/pause.c"
        # the build tree (2.8 GB) is not needed again
        rm -rf "$CACHE/src" "$CACHE/gocache" "$CACHE/apt"
    fi
    [ -f "$CACHE/pause.tar" ] || pause_image
}

pause_image() {
    local B=(buildah --storage-driver vfs) ctr
    ctr=$("${B[@]}" from scratch)
    "${B[@]}" copy "$ctr" "$BIN/pause" /pause >/dev/null
    "${B[@]}" config --entrypoint '["/pause"]' "$ctr"
    "${B[@]}" commit --quiet "$ctr" "$PAUSE_IMAGE" >/dev/null
    "${B[@]}" rm "$ctr" >/dev/null
    "${B[@]}" push --quiet "$PAUSE_IMAGE" "docker-archive:$CACHE/pause.tar:$PAUSE_IMAGE"
    "${B[@]}" rmi "$PAUSE_IMAGE" >/dev/null
}

# ---- certificates and configuration ------------------------------------------------------------------

cert() {  # cert NAME SUBJECT [SAN]: a key and a certificate signed by the cluster's CA
    local name=$1 subject=$2 san=${3:-}
    local ext="$STATE/pki/$name.ext"
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n' >"$ext"
    printf 'extendedKeyUsage=serverAuth,clientAuth\n' >>"$ext"
    [ -n "$san" ] && echo "subjectAltName=$san" >>"$ext"
    openssl req -new -newkey rsa:2048 -nodes -keyout "$STATE/pki/$name.key" -subj "$subject" \
        -out "$STATE/pki/$name.csr" 2>/dev/null
    openssl x509 -req -in "$STATE/pki/$name.csr" -CA "$STATE/pki/ca.crt" -CAkey "$STATE/pki/ca.key" \
        -CAcreateserial -days 3650 -extfile "$ext" -out "$STATE/pki/$name.crt" 2>/dev/null
}

kubeconfig() {  # kubeconfig NAME CERT: a kubeconfig for the apiserver with that client certificate
    cat >"$STATE/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: gpt2-test
  cluster: {server: "https://127.0.0.1:6443", certificate-authority: "$STATE/pki/ca.crt"}
users:
- name: $1
  user: {client-certificate: "$STATE/pki/$2.crt", client-key: "$STATE/pki/$2.key"}
contexts:
- name: gpt2-test
  context: {cluster: gpt2-test, user: $1, namespace: default}
current-context: gpt2-test
EOF
}

write_config() {
    mkdir -p "$STATE/pki" "$STATE/etcd" "$STATE/kubelet" "$STATE/cni" "$RUN" "$LOG"
    if [ ! -f "$STATE/pki/ca.crt" ]; then
        openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$STATE/pki/ca.key" -subj "/CN=gpt2-test-ca" \
            -days 3650 -out "$STATE/pki/ca.crt" 2>/dev/null
        cert apiserver "/CN=kube-apiserver" \
            "DNS:$NODE,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:127.0.0.1,IP:10.96.0.1"
        cert admin "/O=system:masters/CN=gpt2-test-admin"
        cert kubelet "/O=system:nodes/CN=system:node:$NODE" "DNS:$NODE,DNS:localhost,IP:127.0.0.1"
        openssl genrsa -out "$STATE/pki/sa.key" 2048 2>/dev/null
        openssl rsa -in "$STATE/pki/sa.key" -pubout -out "$STATE/pki/sa.pub" 2>/dev/null
        kubeconfig admin admin        # kubectl, the controller-manager and the scheduler
        kubeconfig kubelet kubelet    # the node's own identity (the Node authorizer)
    fi
    cat >"$STATE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $STATE/pki/kubelet.crt
tlsPrivateKeyFile: $STATE/pki/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $STATE/pki/ca.crt}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
failSwapOn: false
makeIPTablesUtilChains: false
# a test node: a full disk must not evict the pods under test
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOF
    # the pod network: one bridge without an address on the host, host-local addresses
    cat >"$STATE/cni/10-gpt2.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "gpt2-pods", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": false, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$STATE/cni-ipam", "ranges": [[{"subnet": "$POD_SUBNET"}]]}}]}
EOF
    cat >"$STATE/containerd.toml" <<EOF
version = 2
root = "$STATE/containerd"
state = "$RUN/containerd"
[grpc]
  address = "$SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # root here lacks CAP_SYS_RESOURCE: the kubelet's -998 for sandboxes would fail every pod
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni"
EOF
}

# ---- daemons -------------------------------------------------------------------------------------------

running() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

start() {  # start NAME COMMAND...: in its own session, output in $LOG/NAME.log, pid in $RUN/NAME.pid
    local name=$1
    shift
    running "$name" && return 0
    setsid "$@" </dev/null >"$LOG/$name.log" 2>&1 &
    echo $! >"$RUN/$name.pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq 1 $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "timed out after ${seconds}s waiting for $what (logs in $LOG)"
}

kctl() { "$BIN/kubectl" --kubeconfig "$STATE/admin.kubeconfig" "$@"; }

node_ready() {
    [ "$(kctl get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

save_host_settings() {
    [ -f "$RUN/sysctls.saved" ] && return 0
    for s in "${SYSCTLS[@]}"; do echo "$s=$(sysctl -n "$s")"; done >"$RUN/sysctls.saved"
}

up() {
    [ "$(id -u)" = 0 ] || die "run as root: the kubelet and containerd need it"
    install
    build
    grep -qE "^127\.0\.0\.1\s.*\b$NODE\b" /etc/hosts || die "the host name $NODE must map to 127.0.0.1 in /etc/hosts"
    write_config
    save_host_settings
    start etcd etcd --name gpt2-test --data-dir "$STATE/etcd" \
        --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
        --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster gpt2-test=http://127.0.0.1:2380
    wait_for 30 etcd curl -fsS http://127.0.0.1:2379/health
    start kube-apiserver "$BIN/kube-apiserver" --etcd-servers http://127.0.0.1:2379 \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port 6443 --insecure-port 0 \
        --service-cluster-ip-range "$SERVICE_RANGE" --endpoint-reconciler-type none \
        --client-ca-file "$STATE/pki/ca.crt" --tls-cert-file "$STATE/pki/apiserver.crt" \
        --tls-private-key-file "$STATE/pki/apiserver.key" \
        --kubelet-client-certificate "$STATE/pki/admin.crt" --kubelet-client-key "$STATE/pki/admin.key" \
        --kubelet-preferred-address-types Hostname \
        --service-account-key-file "$STATE/pki/sa.pub" --service-account-signing-key-file "$STATE/pki/sa.key" \
        --service-account-issuer https://kubernetes.default.svc \
        --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction
    wait_for 60 "the API server" kctl get --raw /readyz
    start kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig "$STATE/admin.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port 10257 --port 0 --leader-elect=false \
        --service-account-private-key-file "$STATE/pki/sa.key" --root-ca-file "$STATE/pki/ca.crt" \
        --use-service-account-credentials=false
    start kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$STATE/admin.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port 10259 --port 0 --leader-elect=false
    start containerd containerd --config "$STATE/containerd.toml"
    wait_for 30 containerd ctr --address "$SOCK" version
    ctr --address "$SOCK" -n k8s.io images import "$CACHE/pause.tar" >/dev/null
    start kubelet "$BIN/kubelet" --config "$STATE/kubelet.yaml" --kubeconfig "$STATE/kubelet.kubeconfig" \
        --container-runtime remote --container-runtime-endpoint "unix://$SOCK" \
        --root-dir "$STATE/kubelet" --hostname-override "$NODE"
    wait_for 90 "node $NODE to be Ready" node_ready
    wait_for 60 "the default service account" kctl get serviceaccount default -n default
    say "up: node $NODE Ready; KUBECONFIG=$STATE/admin.kubeconfig; kubectl: $BIN/kubectl"
}

# ---- stop, and put the host back ------------------------------------------------------------------------

stop() {  # stop NAME: SIGTERM, up to 30 s, then SIGKILL
    running "$1" || { rm -f "$RUN/$1.pid"; return 0; }
    local pid
    pid=$(cat "$RUN/$1.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$RUN/$1.pid"
}

down() {
    # nothing may recreate pods; then the pods, while the kubelet still runs, so that their
    # containers and mounts go its way
    stop kube-controller-manager
    stop kube-scheduler
    if running kube-apiserver && running kubelet; then
        kctl delete pods --all --all-namespaces --grace-period 5 --timeout 60s >/dev/null 2>&1 || true
    fi
    local d
    for d in kubelet containerd kube-apiserver etcd; do stop "$d"; done
    # containerd's shims outlive it; they are ours when their socket lies under our state directory
    pkill -f "containerd-shim-runc-v2 .*-address $SOCK" 2>/dev/null || true
    awk -v s="$STATE/" '$2 ~ "^"s {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    awk -v s="$RUN/" '$2 ~ "^"s {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '/^cni-/ {print $1}'); do ip netns delete "$ns" 2>/dev/null || true; done
    ip link delete "$BRIDGE" 2>/dev/null || true
    # the kubelet's cgroups (cgroupfs driver): children before parents
    find /sys/fs/cgroup/*/kubepods -depth -type d 2>/dev/null | xargs -r rmdir 2>/dev/null || true
    if [ -f "$RUN/sysctls.saved" ]; then
        while IFS= read -r line; do sysctl -q -w "$line" >/dev/null; done <"$RUN/sysctls.saved"
        rm -f "$RUN/sysctls.saved"
    fi
    rm -rf "$STATE/containerd" "$STATE/kubelet" "$STATE/etcd" "$STATE/cni-ipam" "$RUN"
    say "down"
}

status() {
    local d
    for d in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet; do
        if running "$d"; then echo "$d: running (pid $(cat "$RUN/$d.pid"))"; else echo "$d: stopped"; fi
    done
    running kube-apiserver && kctl get nodes -o wide
    running kube-apiserver && node_ready
}

show_env() {  # where things are, for the tests and for a user's shell: eval "$(scripts/k8s-cluster.sh env)"
    echo "KUBECONFIG=$STATE/admin.kubeconfig"
    echo "KUBECTL=$BIN/kubectl"
    echo "CONTAINERD_ADDRESS=$SOCK"
    echo "K8S_NODE=$NODE"
}

case "${1:-up}" in
    up) up ;;
    build) install && build ;;
    down) down ;;
    status) status ;;
    env) show_env ;;
    *) echo "usage: $0 up|down|status|env|build" >&2; exit 2 ;;
esac
