#!/bin/bash
# A streaming replica: on first start, a base backup of the primary (with
# standby.signal and primary_conninfo written by -R); then PostgreSQL.
set -euo pipefail
if [[ ! -s "$PGDATA/PG_VERSION" ]]; then
    until pg_isready -h "$PRIMARY_HOST" -p 5432 -U replicator -q; do sleep 1; done
    PGPASSWORD="$REPLICATION_PASSWORD" pg_basebackup -h "$PRIMARY_HOST" -p 5432 -U replicator \
        -D "$PGDATA" -R -X stream --checkpoint=fast
    chmod 700 "$PGDATA"
fi
exec postgres -c hot_standby=on
