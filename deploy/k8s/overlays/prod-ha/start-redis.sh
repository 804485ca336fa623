#!/bin/sh
# Starts Redis as the primary the Sentinels name, or as its replica. A pod that comes back after a
# failover rejoins as a replica of the new primary; with no Sentinel answering (a new cluster),
# ldm-redis-0 is the primary.
set -eu
domain="ldm-redis-headless.${POD_NAMESPACE}.svc.cluster.local"
self="$(hostname).${domain}"
master=""
for i in 0 1 2; do
  sentinel="ldm-sentinel-${i}.ldm-sentinel-headless.${POD_NAMESPACE}.svc.cluster.local"
  master=$(redis-cli -h "$sentinel" -p 26379 --raw sentinel get-master-addr-by-name ldm 2>/dev/null | head -n 1)
  if [ -n "$master" ]; then break; fi
done
if [ -z "$master" ]; then master="ldm-redis-0.${domain}"; fi
set -- /etc/ldm-redis/redis.conf --replica-announce-ip "$self" --maxmemory "$REDIS_MAXMEMORY"
if [ "$master" != "$self" ]; then set -- "$@" --replicaof "$master" 6379; fi
exec redis-server "$@"
