#!/bin/bash
# A real one-node SLURM cluster on this machine, for testing the SLURM path end to end
# (tests/experiments/test_slurm.py, .ci/run): munge, MariaDB + slurmdbd, slurmctld and slurmd, all on this
# host. Needs root and Debian's SLURM packages (installed when missing); no systemd. The first
# start installs and takes a few minutes, later ones seconds. Stop it with down.sh (by PID).
#   bash slurm/local-cluster/up.sh
# Accounting (slurmdbd) is not optional: submitit polls `sacct` for job states, and without it
# a task that dies before writing its result is never seen to end.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" -ne 0 ]; then
    echo "slurm/local-cluster/up.sh starts system daemons: run it as root (sudo bash $0)" >&2
    exit 1
fi
HOST=$(hostname -s)
if command -v sinfo >/dev/null && timeout 10 sinfo -h -o %t 2>/dev/null | grep -q -E 'idle|mix|alloc'; then
    echo "SLURM is already up on $HOST"
    exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm slurm-client munge slurmdbd mariadb-server
fi

# munge: the package generated /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null

# MariaDB, the store of slurmdbd
mkdir -p /run/mysqld && chown mysql:root /run/mysqld
if ! mariadb -u root -e 'select 1' >/dev/null 2>&1; then
    nohup /usr/sbin/mariadbd --user=mysql --innodb-buffer-pool-size=64M >/var/log/mariadbd-slurm-local.log 2>&1 &
    echo $! >/run/mariadbd-slurm-local.pid
fi
for _ in $(seq 30); do mariadb -u root -e 'select 1' >/dev/null 2>&1 && break; sleep 1; done
mariadb -u root -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdbpass';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
chown slurm:slurm /var/spool/slurmctld /var/log/slurm
cat >/etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmdbpass
StorageLoc=slurm_acct_db
CONF
chown slurm:slurm /etc/slurm/slurmdbd.conf && chmod 600 /etc/slurm/slurmdbd.conf
# the node: this machine's cores and memory (less 1 GB for the daemons)
CPUS=$(nproc)
MEMORY_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat >/etc/slurm/slurm.conf <<CONF
ClusterName=localcluster
SlurmctldHost=$HOST
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# look at pending jobs every 5 s (default 60 s and 30 s): a requeued job, held for 2 minutes,
# starts as soon as it may
SchedulerParameters=sched_interval=5,bf_interval=5
MpiDefault=none
ReturnToService=2
NodeName=$HOST CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEMORY_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

/usr/sbin/slurmdbd
for _ in $(seq 30); do [ -s /run/slurmdbd.pid ] && sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 1; done
/usr/sbin/slurmctld  # registers the cluster in slurmdbd by itself
sleep 2
/usr/sbin/slurmd
for _ in $(seq 30); do sinfo -h -o %t | grep -q idle && break; sleep 1; done
sinfo
timeout 60 srun hostname
