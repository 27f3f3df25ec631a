#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on loopback for the tests, print its URL on stdout.
# Usage: eval "$(scripts/pg.sh start)"   -> exports CRP_TEST_POSTGRES_URL and CRP_TEST_PG_DIR
#        scripts/pg.sh stop "$CRP_TEST_PG_DIR"
set -euo pipefail

pg_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  return 1
}

ensure_installed() {
  if ! pg_bin >/dev/null; then
    echo "installing PostgreSQL server (apt)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) >&2
  fi
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
  start)
    ensure_installed
    bin=$(pg_bin)
    dir=$(mktemp -d /tmp/crp-pg.XXXXXX)
    chmod 755 "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    as_pg "$bin/initdb" -D "$dir/data" -U crp --auth=trust -E UTF8 >/dev/null
    # Pick a free port on loopback.
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null
    as_pg "$bin/createdb" -h 127.0.0.1 -p "$port" -U crp crp_test
    echo "export CRP_TEST_PG_DIR=$dir"
    echo "export CRP_TEST_POSTGRES_URL=postgres://crp@127.0.0.1:$port/crp_test"
    ;;
  stop)
    dir="${2:?data dir}"
    bin=$(pg_bin)
    as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
  *) echo "usage: $0 start | stop DIR" >&2; exit 2 ;;
esac
