#!/usr/bin/env bash
# `make monitor`: a local Prometheus and Alertmanager on loopback. Prometheus scrapes local training (ranks on
# 127.0.0.1:19400..19407) and sharding (127.0.0.1:19390), evaluates tubelet's recording and alert rules and sends
# alerts to the Alertmanager (configs/monitoring/alertmanager.yml: a webhook receiver, edit its url). Runs in the
# foreground until Ctrl-C; the time series stay in $MONITOR_DATA for the next start.
#
#   MONITOR_ADDR       Prometheus listen address (default 127.0.0.1:9090)
#   MONITOR_DATA       TSDB folder (default runs/prometheus)
#   ALERTMANAGER_ADDR  Alertmanager listen address (default 127.0.0.1:9093; prometheus.yml sends there)
#   extra arguments go to prometheus, e.g. scripts/monitor.sh --storage.tsdb.retention.time=30d
set -euo pipefail
cd "$(dirname "$0")/.."

ADDR=${MONITOR_ADDR:-127.0.0.1:9090}
DATA=${MONITOR_DATA:-runs/prometheus}
AM_ADDR=${ALERTMANAGER_ADDR:-127.0.0.1:9093}
CONFIG=configs/monitoring/prometheus.yml
AM_CONFIG=configs/monitoring/alertmanager.yml
DASHBOARD=configs/monitoring/grafana/dashboards/tubelet.json

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || ! command -v prometheus-alertmanager >/dev/null; then
  echo "monitor: installing Debian's prometheus and prometheus-alertmanager packages ..."
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus \
    prometheus-alertmanager >/dev/null
fi

promtool check config "$CONFIG" >/dev/null
amtool check-config "$AM_CONFIG" >/dev/null

in_use() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }
if in_use "$ADDR"; then
  echo "monitor: $ADDR is already in use (Debian's prometheus service? 'systemctl stop prometheus')," \
       "or pick another address: MONITOR_ADDR=127.0.0.1:9091 make monitor" >&2
  exit 1
fi

ranks=()
for p in $(seq 19400 19407); do
  in_use "127.0.0.1:$p" && ranks+=("$p")
done
if [ ${#ranks[@]} -eq 0 ]; then
  echo "monitor: no training rank serves metrics on 127.0.0.1:19400..19407 yet; they are scraped once a job starts"
else
  echo "monitor: training ranks serving metrics on ports ${ranks[*]}"
fi
in_use 127.0.0.1:19390 && echo "monitor: a sharding job serves its progress on 127.0.0.1:19390"

mkdir -p "$DATA" runs/alertmanager
if in_use "$AM_ADDR"; then
  echo "monitor: an Alertmanager already listens on $AM_ADDR; alerts go there"
else
  prometheus-alertmanager --config.file="$AM_CONFIG" --storage.path=runs/alertmanager \
    --web.listen-address="$AM_ADDR" --cluster.listen-address= >runs/alertmanager/alertmanager.log 2>&1 &
  am_pid=$!
  trap 'kill $am_pid 2>/dev/null' EXIT
  echo "monitor: Alertmanager on http://$AM_ADDR (log: runs/alertmanager/alertmanager.log)"
fi
cat <<MSG
monitor: Prometheus on http://$ADDR  (alerts: http://$ADDR/alerts, targets: http://$ADDR/targets)
monitor: time series in $DATA
monitor: Grafana: import $DASHBOARD (pick this Prometheus as its datasource),
         or provision it with configs/monitoring/grafana/provisioning/{datasources,dashboards}/tubelet.yml
MSG
prometheus --config.file="$CONFIG" --storage.tsdb.path="$DATA" --web.listen-address="$ADDR" "$@"
