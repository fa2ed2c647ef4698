#!/usr/bin/env bash
# Install a single-machine SLURM cluster (controller + compute node + accounting)
# from Debian packages.  Idempotent: packages already installed are skipped.
set -euo pipefail

PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

if [[ $EUID -ne 0 ]]; then
  echo "install.sh: must run as root (apt-get install)" >&2
  exit 1
fi
missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install.sh: all packages already installed: ${PKGS[*]}"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install.sh: apt-get not found (Debian/Ubuntu only)" >&2
  exit 2
fi

start=$(date +%s)
echo "install.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Do not let the packages' maintainer scripts start daemons: start.sh does that
# with its own configuration (there is no systemd here anyway).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  created_policy=1
fi
trap '[[ $created_policy -eq 1 ]] && rm -f "$policy"' EXIT

# apt-get update only when the package lists are missing or older than a day
if [[ -z $(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -n1) ]]; then
  apt-get update -qq
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install.sh: installed ${missing[*]} in $(( $(date +%s) - start )) s"
