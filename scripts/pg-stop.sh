#!/usr/bin/env bash
# Stop the private PostgreSQL cluster that scripts/run.sh started under .pgdata/.
#
#   scripts/pg-stop.sh           stop it (data is kept; run.sh starts it again)
#   scripts/pg-stop.sh --purge   stop it and delete .pgdata/ (all stored events)
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/pg.sh
. "$ROOT/scripts/lib/pg.sh"

case ${1:-} in
    "") purge="" ;;
    --purge) purge=1 ;;
    *) echo "usage: scripts/pg-stop.sh [--purge]" >&2; exit 64 ;;
esac

if [[ -d $ROOT/.pgdata/data ]]; then
    if pg_running "$ROOT/.pgdata/data"; then
        pg_stop "$ROOT/.pgdata/data"
    else
        echo "pg-stop.sh: the private cluster in .pgdata/ is not running" >&2
    fi
else
    echo "pg-stop.sh: no private cluster in .pgdata/" >&2
fi
if [[ -n $purge ]]; then
    rm -rf -- "$ROOT/.pgdata"
    echo "pg-stop.sh: removed .pgdata/" >&2
fi
