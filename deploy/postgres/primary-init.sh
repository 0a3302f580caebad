#!/bin/bash
# Runs once, when the primary's data directory is created: the roles the
# replicas and tidepool log in as, and replication allowed over the network.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD 'replicator';
CREATE ROLE app WITH LOGIN PASSWORD 'secret';
ALTER DATABASE app OWNER TO app;
ALTER SCHEMA public OWNER TO app;
SQL
echo "host replication replicator all scram-sha-256" >>"$PGDATA/pg_hba.conf"
