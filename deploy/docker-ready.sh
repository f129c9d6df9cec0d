#!/usr/bin/env bash
# Make this machine ready for the containers: Docker, Compose, debootstrap and Prometheus installed, dockerd
# running. Idempotent: does nothing when all is there. Installs through apt only when run as root on Debian.
set -euo pipefail
missing=()
command -v dockerd >/dev/null || missing+=(docker.io containerd runc iptables)
command -v docker >/dev/null || missing+=(docker.io)
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
    missing+=(docker-compose)
fi
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v prometheus >/dev/null || missing+=(prometheus)
if ((${#missing[@]})); then
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
        echo "docker-ready: missing ${missing[*]}: install them (Debian: sudo apt-get install ${missing[*]})" >&2
        exit 1
    fi
    echo "docker-ready: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Sorted and unique; no recommends: only what the build, the stack and its test use.
    mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    if [[ $(id -u) != 0 ]]; then
        echo "docker-ready: the Docker daemon is not reachable; start it (sudo systemctl start docker)" >&2
        exit 1
    fi
    if [[ -d /run/systemd/system ]]; then
        systemctl start docker
    else
        # No init system on CI machines: start the daemon in the background, it is ready in about a second.
        echo "docker-ready: starting dockerd"
        nohup dockerd >/var/log/dockerd.log 2>&1 &
    fi
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { tail -20 /var/log/dockerd.log >&2; exit 1; }
fi
echo "docker-ready: $(docker version --format 'client {{.Client.Version}}, server {{.Server.Version}}')"
