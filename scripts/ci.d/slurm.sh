#!/usr/bin/env bash
# Slurm for tests/slurm: Debian's slurmctld, slurmd and client tools (22.05) plus munge, about
# 3 MB. The tests start their own cluster on 127.0.0.1 (moe_lab/testing/slurm_cluster.py);
# nothing is started here (the packages' services are not wanted, and Debian's policy in
# containers keeps them from starting anyway).
set -euo pipefail
if [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && command -v sbatch >/dev/null
then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
