#!/bin/sh
# Starts a Sentinel watching the primary the other Sentinels name (after a failover that is no longer
# ldm-redis-0), or ldm-redis-0 in a new cluster. Its file is on an emptyDir: Sentinel rewrites it.
set -eu
self="$(hostname).ldm-sentinel-headless.${POD_NAMESPACE}.svc.cluster.local"
master=""
for i in 0 1 2; do
  peer="ldm-sentinel-${i}.ldm-sentinel-headless.${POD_NAMESPACE}.svc.cluster.local"
  if [ "$peer" = "$self" ]; then continue; fi
  master=$(redis-cli -h "$peer" -p 26379 --raw sentinel get-master-addr-by-name ldm 2>/dev/null | head -n 1)
  if [ -n "$master" ]; then break; fi
done
if [ -z "$master" ]; then master="ldm-redis-0.ldm-redis-headless.${POD_NAMESPACE}.svc.cluster.local"; fi
sed -e "s/\$SELF/${self}/" -e "s/\$MASTER/${master}/" /etc/ldm-redis/sentinel.conf >/sentinel/sentinel.conf
exec redis-server /sentinel/sentinel.conf --sentinel
