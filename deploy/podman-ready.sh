#!/usr/bin/env bash
# Make this machine ready for the Kubernetes pod test: podman (to run the rendered pods with `podman kube play`)
# and catatonit (the init of podman's pause container, only a recommendation of Debian's podman), and kubectl's
# kustomize to render the overlays. Idempotent: does nothing when all is there. Installs through apt only when
# run as root on Debian. kubernetes-validate comes from the dev extra (pip), not from here.
set -euo pipefail
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v catatonit >/dev/null || [[ -x /usr/libexec/podman/catatonit ]] || missing+=(catatonit)
if ((${#missing[@]})); then
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
        echo "podman-ready: missing ${missing[*]}: install them (Debian: sudo apt-get install ${missing[*]})" >&2
        exit 1
    fi
    echo "podman-ready: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # No recommends: buildah, fuse-overlayfs and slirp4netns are not needed by a rootful `podman kube play`.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v kubectl >/dev/null; then
    # Not in Debian bookworm's archive: say where it comes from instead of guessing a download.
    echo "podman-ready: kubectl is missing: install it from https://kubernetes.io/docs/tasks/tools/" >&2
    exit 1
fi
echo "podman-ready: $(podman --version), kubectl $(kubectl version --client -o json | sed -n 's/.*"gitVersion": "\([^"]*\)".*/\1/p' | head -1)"
