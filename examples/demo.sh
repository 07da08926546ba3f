#!/usr/bin/env bash
# `make demo`: the configuration toolkit on sample files, in a throwaway folder.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cp -a "$here/examples/config" "$work/config"
cp "$here/examples/env.sample" "$work/.env"
cp "$here/examples/env.example" "$work/.env.example"
chmod 600 "$work/.env"
export CONFIG_DIR="$work/config" CONFIG_BACKUP_DIR="$work/config_backups" ENV_FILE="$work/.env"
cd "$work"

step() { printf '\n\033[1m== %s\033[0m\n' "$1"; }
run() { printf '$ %s\n' "$*"; "$@"; }
expect_fail() { printf '$ %s\n' "$*"; set +e; "$@"; code=$?; set -e; printf '(exit code %s)\n' "$code"; }
cr() { python "$here/config_rollback.py" "$@"; }

step "Before the deployment: take a backup"
run cr backup --label "before release 1.4"
run cr list

step "The deployment changes the port (comments and layout are kept; only one line changes)"
run cr update app.yml '{"server": {"port": 9090}, "logging": {"level": "debug"}}'
run cr update .env '{"DB_PASSWORD": "rotated secret", "FEATURE_FLAGS": null}'

step "Something goes wrong: a file is broken and another deleted"
printf 'server: [unclosed\n' > config/app.yml
rm config/services/cache.json
expect_fail cr verify --against latest

step "Roll back: restore the backup taken before the deployment"
first=$(cr --json list | python -c 'import json,sys; print(json.load(sys.stdin)["backups"][-1]["id"])')
run cr restore "$first" --yes

step "Verify: everything parses and nothing differs from the backup"
run cr verify --against "$first"
run cr list

step "Retention: what cleanup would remove (keeping the newest 2)"
run cr cleanup 0 --keep 2 --dry-run
printf '\nDemo finished: the configuration is back to the state before the deployment.\n'
