#!/usr/bin/env bash
# `make monitor`: a local Prometheus on loopback that scrapes a local training job (ranks on 127.0.0.1:9400..9407,
# see configs/monitoring/prometheus.yml) and evaluates tubelet's recording and alert rules. Runs in the
# foreground until Ctrl-C; the time series stay in $MONITOR_DATA for the next start.
#
#   MONITOR_ADDR  listen address (default 127.0.0.1:9090)
#   MONITOR_DATA  TSDB folder (default runs/prometheus)
#   extra arguments go to prometheus, e.g. scripts/monitor.sh --storage.tsdb.retention.time=30d
set -euo pipefail
cd "$(dirname "$0")/.."

ADDR=${MONITOR_ADDR:-127.0.0.1:9090}
DATA=${MONITOR_DATA:-runs/prometheus}
CONFIG=configs/monitoring/prometheus.yml
DASHBOARD=configs/monitoring/grafana/dashboards/tubelet.json

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "monitor: installing Debian's prometheus package (prometheus + promtool) ..."
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

promtool check config "$CONFIG" >/dev/null

host=${ADDR%:*}; port=${ADDR##*:}
if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
  echo "monitor: $ADDR is already in use (Debian's prometheus service? 'systemctl stop prometheus')," \
       "or pick another address: MONITOR_ADDR=127.0.0.1:9091 make monitor" >&2
  exit 1
fi

ranks=()
for p in $(seq 9400 9407); do
  (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && ranks+=("$p")
done
if [ ${#ranks[@]} -eq 0 ]; then
  echo "monitor: no training rank serves metrics on 127.0.0.1:9400..9407 yet; they are scraped once a job starts"
else
  echo "monitor: training ranks serving metrics on ports ${ranks[*]}"
fi

mkdir -p "$DATA"
cat <<MSG
monitor: Prometheus on http://$ADDR  (alerts: http://$ADDR/alerts, targets: http://$ADDR/targets)
monitor: time series in $DATA
monitor: Grafana: import $DASHBOARD (pick this Prometheus as its datasource),
         or provision it with configs/monitoring/grafana/provisioning/{datasources,dashboards}/tubelet.yml
MSG
exec prometheus --config.file="$CONFIG" --storage.tsdb.path="$DATA" --web.listen-address="$ADDR" "$@"
