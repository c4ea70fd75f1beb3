#!/usr/bin/env bash
# The database's share of keel's claim+complete: pgbench runs keel's own statements
# (keel_claim_complete.sql) on a fresh schema made by keel's PostgreSQL migrations with
# PREFILL pending pooled commands, then the raw baseline (../../../../../shared/peers/raw-sql)
# on a fresh table of as many jobs; RUNS times each, alternating.
#   bash crates/keel-store/benches/pgbench/run.sh   (env: RUNS=3 SECS=15 CLIENTS=4 PREFILL=1000000)
# With VARIANTS=1, each run also times other shapes of the same work, each on a fresh
# backlog: keel's statements grouped (made from keel_claim_complete.sql below: four claims of
# 10 then one completion of 40; the same with the claims in one transaction; one claim of 40)
# and the statements of variants/ (a narrow lease table). A variant's first line says how many
# jobs one of its transactions does, `-- jobs: N`; `<name>.schema.sql` / `<name>.fill.sql`
# beside it are applied after the migrations / the backlog.
# Uses the schema `keel_pgbench` of the database at PGHOST/PGUSER/PGDATABASE
# (default 127.0.0.1, postgres, test) and drops it at the end.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
migrations="$here/../../migrations/postgres"
raw="${RAW_SQL:-$here/../../../../../shared/peers/raw-sql}"
RUNS=${RUNS:-3} SECS=${SECS:-15} CLIENTS=${CLIENTS:-4} PREFILL=${PREFILL:-1000000}
export PGHOST=${PGHOST:-127.0.0.1} PGUSER=${PGUSER:-postgres} PGDATABASE=${PGDATABASE:-test}
export PGOPTIONS="-c search_path=keel_pgbench -c client_min_messages=warning"
q() { psql -qX -v ON_ERROR_STOP=1 "$@" >/dev/null; }
jobs_per_second() { sed -n 's/^tps = \([0-9.]*\).*/\1/p' | awk -v n="$1" '{printf "%.0f\n", $1 * n}'; }

keel_fresh() {
  q -c "DROP SCHEMA IF EXISTS keel_pgbench CASCADE" -c "CREATE SCHEMA keel_pgbench"
  for f in "$migrations"/*.sql; do q -f "$f"; done
  [ -z "${1:-}" ] || [ ! -f "${1%.sql}.schema.sql" ] || q -f "${1%.sql}.schema.sql"
  q <<SQL
INSERT INTO organisations VALUES ('00000000-0000-0000-0000-000000000001', 'bench', now());
INSERT INTO agents (id, org_id, name, created_at)
  SELECT ('00000000-0000-0000-0000-0000000001' || lpad(n::text, 2, '0'))::uuid,
         '00000000-0000-0000-0000-000000000001', 'agent-' || n, now()
  FROM generate_series(1, 64) n;
INSERT INTO commands (id, org_id, command_type, queue, params, priority, run_at, max_attempts,
  lease_duration_ms, status, created_at, updated_at)
SELECT ('01900000-0000-7000-8000-' || lpad(to_hex(n), 12, '0'))::uuid,
  '00000000-0000-0000-0000-000000000001', 'run', 'work', '{"n": 1}', 0,
  now() - interval '1 hour' + n * interval '1 microsecond', 5, 300000, 'pending', now(), now()
FROM generate_series(1, $PREFILL) n;
SQL
  [ -z "${1:-}" ] || [ ! -f "${1%.sql}.fill.sql" ] || q -f "${1%.sql}.fill.sql"
  q -c "VACUUM ANALYZE" -c "CHECKPOINT"
}

raw_fresh() {
  q -f "$raw/schema.sql"
  q -c "INSERT INTO jobs (payload) SELECT '{\"n\":1}' FROM generate_series(1, $PREFILL)"
  q -c "VACUUM ANALYZE jobs" -c "CHECKPOINT"
}

# keel's claim+complete regrouped into the files of $1 (pgbench reads a script from one file).
grouped_variants() {
  local claim complete join
  claim=$(sed -n '/^WITH picked/,/^\\gset$/p' "$here/keel_claim_complete.sql")
  complete=$(sed -n '/^\\gset$/,$p' "$here/keel_claim_complete.sql" | tail -n +2)
  join='s/:ids::uuid\[\]/(:ids0::uuid[] || :ids1::uuid[] || :ids2::uuid[] || :ids3::uuid[])/'
  join="$join;"'s/:tokens::text\[\]/(:tokens0::text[] || :tokens1::text[] || :tokens2::text[] || :tokens3::text[])/'
  four_claims() { for i in 0 1 2 3; do sed "s/AS ids,/AS ids$i,/; s/AS tokens FROM/AS tokens$i FROM/" <<<"$claim"; done; }
  { echo "-- jobs: 40"; four_claims; sed "$join" <<<"$complete"; } >"$1/claim10x4_complete40.sql"
  { echo "-- jobs: 40"; echo "BEGIN;"; four_claims; echo "COMMIT;"; sed "$join" <<<"$complete"; } \
    >"$1/claim10x4_in_one_transaction_complete40.sql"
  { echo "-- jobs: 40"; sed 's/LIMIT 10 FOR UPDATE/LIMIT 40 FOR UPDATE/' <<<"$claim"; echo "$complete"; } \
    >"$1/claim40_complete40.sql"
}

run() { pgbench -n -M prepared -j 2 -c "$CLIENTS" -T "$SECS" -f "$1" 2>&1 | jobs_per_second "${2:-10}"; }

printf "%-5s %-22s %s\n" run "keel statements /s" "raw claim+complete /s"
for r in $(seq "$RUNS"); do
  keel_fresh
  k=$(run "$here/keel_claim_complete.sql")
  raw_fresh
  b=$(run "$raw/claim_complete.sql")
  printf "%-5s %-22s %s\n" "$r" "$k" "$b"
  if [ -n "${VARIANTS:-}" ]; then
    grouped=$(mktemp -d)
    grouped_variants "$grouped"
    for v in "$grouped"/*.sql "$here"/variants/*.sql; do
      case "$v" in *.schema.sql | *.fill.sql) continue ;; esac
      keel_fresh "$v"
      printf "      %-40s %s\n" "$(basename "$v" .sql)" "$(run "$v" "$(sed -n '1s/^-- jobs: //p' "$v")")"
    done
    rm -rf "$grouped"
  fi
done
q -c "DROP SCHEMA keel_pgbench CASCADE"
echo "$CLIENTS clients, ${SECS}s per run, $PREFILL pending; postgres $(psql -qtAX -c 'SHOW server_version')"
