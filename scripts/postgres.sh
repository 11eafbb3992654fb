#!/usr/bin/env bash
# A private PostgreSQL from the Debian packages, for tests and local replicas. Never touches a
# system cluster: initdb into DIR, socket in DIR, listening on 127.0.0.1 only, trust auth.
#   scripts/postgres.sh install            apt-get install postgresql when its binaries are missing
#   scripts/postgres.sh bindir             print where initdb/pg_ctl are (exit 1: not installed)
#   scripts/postgres.sh start DIR [PORT]   initdb DIR once, start on 127.0.0.1:PORT (55432); prints a DSN
#   scripts/postgres.sh stop DIR [MODE]    stop (MODE: fast | immediate | smart; default fast)
#   scripts/postgres.sh status DIR         exit 0 while it runs
#   scripts/postgres.sh psql DIR [ARGS]    psql into it (over its socket)
# As root the server runs as the `postgres` user (initdb refuses root). SEQR_POSTGRES_BIN
# overrides the binary directory (one without initdb counts as "not installed": SEQR_POSTGRES_BIN=none
# runs the tests as on a machine without PostgreSQL).
set -euo pipefail

bindir() {
  local d
  if [[ -n ${SEQR_POSTGRES_BIN:-} ]]; then   # as told, or not at all (SEQR_POSTGRES_BIN=none: "not installed")
    [[ -x $SEQR_POSTGRES_BIN/initdb && -x $SEQR_POSTGRES_BIN/pg_ctl ]] || return 1
    echo "$SEQR_POSTGRES_BIN"; return
  fi
  if command -v pg_config >/dev/null 2>&1; then
    d=$(pg_config --bindir 2>/dev/null || true)
    if [[ -n $d && -x $d/initdb && -x $d/pg_ctl ]]; then echo "$d"; return; fi
  fi
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [[ -n $d && -x $d/initdb ]]; then echo "$d"; return; fi
  if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return; fi
  return 1
}

as_pg() {
  if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

cmd=${1:-help}; shift || true
case "$cmd" in
  install)
    if bindir >/dev/null; then exit 0; fi
    sudo=""; [[ $(id -u) == 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    bindir >/dev/null || { echo "postgresql installed but initdb not found" >&2; exit 1; }
    ;;
  bindir) bindir ;;
  start)
    dir=$(realpath -m "$1"); port=${2:-55432}; B=$(bindir)
    mkdir -p "$dir"; chmod 700 "$dir"
    if [[ $(id -u) == 0 ]]; then
      chown postgres: "$dir"
      runuser -u postgres -- test -w "$dir" \
        || { echo "the postgres user cannot reach $dir (a parent directory is private); use e.g. mktemp -d" >&2; exit 1; }
    fi
    if [[ ! -f $dir/data/PG_VERSION ]]; then
      as_pg "$B/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    as_pg "$B/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >/dev/null \
      || { tail -n 20 "$dir/postgres.log" >&2; exit 1; }
    echo "host=127.0.0.1 port=$port user=postgres dbname=postgres"
    ;;
  stop)
    dir=$(realpath -m "$1"); B=$(bindir)
    as_pg "$B/pg_ctl" -D "$dir/data" -m "${2:-fast}" -w -t 60 stop >/dev/null
    ;;
  psql)
    dir=$(realpath -m "$1"); shift; B=$(bindir)
    port=$(sed -n 4p "$dir/data/postmaster.pid")
    "$B/psql" -X -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -d postgres "$@"
    ;;
  status)
    dir=$(realpath -m "$1"); B=$(bindir)
    as_pg "$B/pg_ctl" -D "$dir/data" status >/dev/null
    ;;
  *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; [[ $cmd == help ]] ;;
esac
