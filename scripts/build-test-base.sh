#!/usr/bin/env bash
# A local stand-in for the CUDA PyTorch base image, for the container test (no registry can be
# pulled from here): Debian bookworm from the package mirror (debootstrap), python3, and the CPU
# torch wheel, committed as localhost/gpt2-test-base:latest in buildah's vfs storage.
set -euo pipefail
IMAGE=${IMAGE:-localhost/gpt2-test-base:latest}
B=(buildah --storage-driver vfs)
if "${B[@]}" inspect --type image "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE exists"; exit 0
fi
for tool in debootstrap buildah; do
    command -v "$tool" >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" >/dev/null; }
done
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
echo "debootstrap bookworm from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; exit 1; }
rm -f "$WORK"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED   # like the official image: pip may install
python3 -m pip download -q --no-deps -d "$WORK/rootfs/tmp/wheels" torch==2.13.0
cp /etc/resolv.conf "$WORK/rootfs/etc/resolv.conf"
# this machine's CA bundle (it may hold a proxy's CA that PyPI is reached through), kept in the base
# so that pip inside the image build reaches PyPI too
cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$WORK/rootfs/etc/pip.conf"
chroot "$WORK/rootfs" sh -c 'python3 -m pip install -q --no-cache-dir /tmp/wheels/torch-*.whl && rm -rf /tmp/wheels'
rm -f "$WORK/rootfs/etc/pip.conf"
ctr=$("${B[@]}" from scratch)
"${B[@]}" copy "$ctr" "$WORK/rootfs" / >/dev/null
CA=/etc/ssl/certs/ca-certificates.crt
"${B[@]}" config --cmd bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env PIP_CERT=$CA --env SSL_CERT_FILE=$CA --env REQUESTS_CA_BUNDLE=$CA "$ctr"
"${B[@]}" commit --quiet "$ctr" "$IMAGE" >/dev/null
"${B[@]}" rm "$ctr" >/dev/null
echo "built $IMAGE"
