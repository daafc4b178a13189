#!/usr/bin/env bash
# A real two-node SLURM cluster on loopback, for the tests: `scripts/slurm-cluster.sh up|down|status`.
#
# Debian's slurm-wlm (22.05) as root, with accounting (slurmdbd + MariaDB, which submitit polls
# through sacct), ProctrackType=proctrack/linuxproc and TaskPlugin=task/none (no cgroups here), and
# two slurmd on one host told apart by Port=. No systemd: every daemon is started here, with its
# output in /var/log/slurm, and stopped by its PID file.
set -euo pipefail

CLUSTER=gpt2test
NODES=(gpt2n1 gpt2n2)
CONF=/etc/slurm
LOG=/var/log/slurm
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

install() {
    local missing=()
    for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if ((${#missing[@]})); then
        echo "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

write_config() {
    mkdir -p "$CONF" "$LOG" /var/spool/slurmctld /var/spool/slurmd /run/munge /var/log/munge /run/mysqld
    for n in "${NODES[@]}"; do
        grep -qE "^127\.0\.0\.1\s.*\b$n\b" /etc/hosts || echo "127.0.0.1 $n" >>/etc/hosts
    done
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))
    cat >"$CONF/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
JobRequeue=1
KillWait=30
StateSaveLocation=/var/spool/slurmctld
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdLogFile=$LOG/slurmd-%n.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=${NODES[0]} NodeAddr=127.0.0.1 Port=17001 CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=${NODES[1]} NodeAddr=127.0.0.1 Port=17002 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    cat >"$CONF/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$CONF/slurmdbd.conf"
    for n in "${NODES[@]}"; do mkdir -p "/var/spool/slurmd/$n"; done
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq 1 $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    echo "timed out waiting for $what" >&2
    return 1
}

up() {
    install
    write_config
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1
    wait_for 10 munge munge -n

    chown mysql:mysql /run/mysqld
    if ! pgrep -x mariadbd >/dev/null; then
        [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
        setsid mariadbd --user=mysql --socket=/run/mysqld/mysqld.sock </dev/null >"$LOG/mariadb.log" 2>&1 &
    fi
    wait_for 30 mariadb mariadb -e "select 1"
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

    pgrep -x slurmdbd >/dev/null || slurmdbd </dev/null >/dev/null 2>&1
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true

    pgrep -x slurmctld >/dev/null || slurmctld </dev/null >/dev/null 2>&1
    wait_for 30 slurmctld scontrol ping
    for n in "${NODES[@]}"; do
        [ -f "/run/slurmd-$n.pid" ] && kill -0 "$(cat "/run/slurmd-$n.pid")" 2>/dev/null && continue
        slurmd -N "$n" </dev/null >/dev/null 2>&1
    done
    wait_for 60 "both nodes idle" bash -c "[ \$(sinfo -h -N -t idle,mix,alloc -o %N | sort -u | wc -l) -ge ${#NODES[@]} ]"
    sinfo -N
}

down() {
    for pidfile in /run/slurmd-*.pid /run/slurmctld.pid /run/slurmdbd.pid; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    pkill -x mariadbd 2>/dev/null || true
    pkill -x munged 2>/dev/null || true
}

case "${1:-up}" in
    up) up ;;
    down) down ;;
    status) sinfo -N && squeue ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
