#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, with accounting (submitit needs sacct), for the tests
# and for trying a sweep before sending it to a real cluster. Idempotent and non-interactive; needs
# root and Debian's packages (installed here when missing). Stop it with .ci/slurm/stop.sh.
#
# Partitions: "debug" (the default) and "high", whose jobs pre-empt debug's (requeued, the user signal at
# once and SIGTERM after GraceTime). Requeued jobs restart after ~10 s (AuthInfo=cred_expire=10).
set -euo pipefail

if timeout 10 sinfo -h >/dev/null 2>&1 && timeout 10 sacct -n -X -S now >/dev/null 2>&1; then
    echo "slurm: already running"
    exit 0
fi

if ! command -v sbatch >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq slurm-wlm slurmdbd munge mariadb-server >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc)
mem=$(($(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024))
etc=/etc/slurm
mkdir -p "$etc" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
chown slurm:slurm /var/spool/slurmctld /var/log/slurm /run/slurm

# munge: refuses to run as root; its folders must belong to its user.
mkdir -p /run/munge /etc/munge /var/log/munge /var/lib/munge
[ -s /etc/munge/munge.key ] || head -c 1024 /dev/urandom >/etc/munge/munge.key
chown -R munge:munge /run/munge /etc/munge /var/log/munge /var/lib/munge
chmod 0700 /etc/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

# MariaDB for slurmdbd (the accounting behind sacct).
mkdir -p /run/mysqld
chown mysql:mysql /run/mysqld
[ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
if ! pgrep -x mariadbd >/dev/null; then
    rm -f /run/mysqld/mysqld.sock  # left by a server that is gone: it would look ready
    runuser -u mysql -- /usr/sbin/mariadbd --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
        --bind-address=127.0.0.1 >/var/log/slurm/mariadb.log 2>&1 &
fi
# Ready when it answers (crash recovery after an unclean stop can take a few seconds).
for _ in $(seq 120); do mariadb -e "SELECT 1" >/dev/null 2>&1 && break; sleep 0.5; done
mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

cat >"$etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurm
CONF
chown slurm:slurm "$etc/slurmdbd.conf"
chmod 0600 "$etc/slurmdbd.conf"

cat >"$etc/slurm.conf" <<CONF
ClusterName=addrepro
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldParameters=preempt_send_user_signal
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SchedulerParameters=defer_batch
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=20
PartitionName=high Nodes=$host MaxTime=INFINITE State=UP PriorityTier=10
CONF

pgrep -x slurmdbd >/dev/null || /usr/sbin/slurmdbd
for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
sacctmgr -i add cluster addrepro >/dev/null 2>&1 || true
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 120); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -1 || true)
    [ "$state" = "idle" ] && break
    [ -n "$state" ] && [ "$state" != "idle" ] && scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
    sleep 0.5
done
sinfo -h -N -o "%N %t" | grep -q idle || { echo "slurm: the node did not come up (see /var/log/slurm)" >&2; exit 1; }
timeout 20 sacct -n -X -S now >/dev/null
echo "slurm: up ($host, $cpus CPUs, partitions debug and high)"
