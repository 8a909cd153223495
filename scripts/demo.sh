#!/usr/bin/env bash
# tokenwarden demo: one command, everything local and throwaway.
#
#   bash scripts/demo.sh                   # runs until Ctrl-C
#   DEMO_SECONDS=30 bash scripts/demo.sh   # stops by itself (CI smoke)
#
# Installs redis-server with apt-get when it is missing, builds the release binaries, starts a
# private redis-server and the fake OAuth provider (access tokens live 20 s), seeds the tenant
# `cloudwarriors` the way the gateway writes it, runs `tokenwarden run`, syncs the tenant's
# directory from two providers (GoTo and Teams) with `tokenwarden sync` and shows the unified
# directory, and every few seconds prints `tokenwarden status` and the GoTo record's refresh
# token as it rotates.
# Everything it starts is stopped, and its temp dir removed, on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DEMO_SECONDS="${DEMO_SECONDS:-0}"
INTERVAL="${DEMO_INTERVAL:-4}"
TENANT=cloudwarriors

say() { printf '\n== %s\n' "$*"; }

# ---------------------------------------------------------------- prerequisites
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}
PKGS=()
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  PKGS+=(redis-server redis-tools)
fi
command -v curl >/dev/null 2>&1 || PKGS+=(curl)
if [ "${#PKGS[@]}" -gt 0 ]; then
  say "installing ${PKGS[*]} (apt-get)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${PKGS[@]}" >/dev/null
  # Debian may start a system redis-server on 6379; the demo does not use it.
fi
command -v cargo >/dev/null 2>&1 || { echo "demo: cargo not found (install Rust first)" >&2; exit 1; }

say "building release binaries (the fake provider is an example)"
# One command for both, as CI's release build: built apart, the daemon alone would be
# compiled a second time (without the examples' dev-dependencies, features unify otherwise).
cargo build --release --quiet --bin tokenwarden --example tokenwarden-fake-provider
TW="$ROOT/target/release/tokenwarden"
FAKE="$ROOT/target/release/examples/tokenwarden-fake-provider"

# ---------------------------------------------------------------- helpers
free_port() {
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
    return
  fi
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    # Nothing answers on it: take it.
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
}

PIDS=()
WORK=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local i pid
  # Newest first: the daemon, then the fake provider, then redis.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid="${PIDS[$i]}"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "$WORK" ] && [ -d "$WORK" ]; then rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

WORK="$(mktemp -d "${TMPDIR:-/tmp}/tokenwarden-demo.XXXXXX")"

wait_for() { # wait_for SECONDS command...
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then return 1; fi
    sleep 0.1
  done
}

# ---------------------------------------------------------------- redis
REDIS_PORT="$(free_port)"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$WORK" --logfile "$WORK/redis.log" --daemonize no &
PIDS+=($!)
RCLI=(redis-cli -p "$REDIS_PORT")
wait_for 10 "${RCLI[@]}" ping || { echo "demo: redis-server did not start" >&2; cat "$WORK/redis.log" >&2; exit 1; }
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
say "redis-server on $REDIS_URL"

# ---------------------------------------------------------------- fake provider
"$FAKE" --ttl 20 >"$WORK/fake.out" 2>"$WORK/fake.err" &
PIDS+=($!)
wait_for 10 test -s "$WORK/fake.out" || { echo "demo: fake provider did not start" >&2; cat "$WORK/fake.err" >&2; exit 1; }
FAKE_PORT="$(head -n1 "$WORK/fake.out" | tr -dc '0-9')"
IDP="http://127.0.0.1:$FAKE_PORT"
say "fake OAuth provider on $IDP (access tokens live 20 s, refresh tokens rotate)"

post() { curl -fsS -X POST -H 'Content-Type: application/json' --data "$2" "$IDP$1" >/dev/null; }

# ---------------------------------------------------------------- seed
now="$(date +%s)"
iso_naive() { date -u -d "@$1" '+%Y-%m-%dT%H:%M:%S.%6N'; }  # Python's datetime.isoformat(), no offset
created="$(iso_naive $((now - 86400)))"

"${RCLI[@]}" HSET "tenant:$TENANT:config" \
  name "Cloud Warriors" primary_provider goto sync_strategy all data_retention_days 90 \
  timezone America/New_York created_at "$created" updated_at "$created" >/dev/null

# seed_provider NAME TYPE STATUS CLIENT_ID ACCOUNT_KEY TOKEN_EXPIRY HEALTH_PATH SCOPES FEATURES FAULTS
seed_provider() {
  local name=$1 type=$2 status=$3 cid=$4 account=$5 expiry=$6 health=$7 scopes=$8 features=$9 faults=${10}
  local secret="secret-$cid" at="at0-$cid" rt="rt0-$cid"
  post /seed "{\"client_id\":\"$cid\",\"client_secret\":\"$secret\",\"refresh_token\":\"$rt\",\"access_token\":\"$at\"$faults}"
  "${RCLI[@]}" HSET "tenant:$TENANT:provider:$name" \
    provider_type "$type" status "$status" auth_type oauth \
    client_id "$cid" client_secret "$secret" account_key "$account" \
    access_token "$at" refresh_token "$rt" token_expiry "$expiry" \
    scopes "$scopes" api_base_url "$IDP/api/$type" health_path "$health" \
    features_enabled "$features" sync_enabled True \
    created_at "$created" updated_at "$created" \
    token_url "$IDP/token" >/dev/null
  "${RCLI[@]}" SADD "tenant:$TENANT:providers" "$name" >/dev/null
}

# GoTo: naive ISO expiry, due in a few seconds.
seed_provider goto goto active cw-goto 4266846632996939781 "$(iso_naive $((now + 4)))" /me \
  '["voice-admin.v1.read", "identity:scim.org"]' '["users", "extensions", "call_queues", "auto_attendants"]' ''
# Teams: expiry as Unix epoch seconds.
seed_provider teams teams active cw-teams 8f2c6a51-3d7e-4b9a-9c1e-2a4f5b6c7d8e "$((now + 6))" /v1.0/organization \
  '["https://graph.microsoft.com/.default"]' '["users", "call_queues"]' ''
# RingCentral: configured but inactive, tracked and never refreshed.
seed_provider ringcentral ringcentral inactive cw-ringcentral 400131212008 "$(iso_naive $((now + 3600)))" /restapi/v1.0/account/~ \
  '["ReadAccounts"]' '["users", "extensions"]' ''
# Zoom: its refresh token was revoked at the provider, so a human must re-authorise.
seed_provider zoom zoom active revoked-cw-zoom zAcc0unt1d "$((now + 5))" /v2/users/me \
  '["user:read:admin"]' '["users"]' ',"revoked":true'

# Directories at the fake APIs (3 records a page): GoTo extensions (users are the
# DIRECT_EXTENSION ones) and Teams users (Graph), the same three people in both.
post /dir/seed '{"provider":"goto","path":"/extensions","items":[
  {"id":"g1","number":"1001","name":"Ada Lovelace","type":"DIRECT_EXTENSION","email":"ada@cloudwarriors.ai"},
  {"id":"g2","number":"1002","name":"Alan Turing","type":"DIRECT_EXTENSION","email":"alan@cloudwarriors.ai"},
  {"id":"g3","number":"1003","name":"Grace Hopper","type":"DIRECT_EXTENSION","email":"grace@cloudwarriors.ai"},
  {"id":"g9","number":"5000","name":"Sales queue","type":"CALL_QUEUE"}]}'
post /dir/seed '{"provider":"teams","path":"/users","items":[
  {"id":"t-ada","displayName":"Ada L.","mail":"Ada@CloudWarriors.ai","businessPhones":["+1 212 555 0101"]},
  {"id":"t-alan","displayName":"Alan T.","mail":"alan@cloudwarriors.ai","businessPhones":["+1 212 555 0102"]},
  {"id":"t-grace","displayName":"Grace H.","mail":"grace@cloudwarriors.ai"},
  {"id":"t-linus","displayName":"Linus","mail":"linus@cloudwarriors.ai"}]}'

say "seeded tenant $TENANT: goto (ISO expiry), teams (epoch expiry), ringcentral (inactive), zoom (revoked); directories for goto and teams"
"${RCLI[@]}" SMEMBERS "tenant:$TENANT:providers" | sort | tr '\n' ' '; echo

# ---------------------------------------------------------------- tokenwarden
LISTEN_PORT="$(free_port)"
export TOKENWARDEN_REDIS_URL="$REDIS_URL"
export TOKENWARDEN_LISTEN="127.0.0.1:$LISTEN_PORT"
export TOKENWARDEN_LOG="${TOKENWARDEN_LOG:-info}"
LOG="$WORK/tokenwarden.log"
"$TW" run >"$LOG" 2>&1 &
TW_PID=$!
PIDS+=("$TW_PID")
if ! wait_for 20 curl -fsS "http://127.0.0.1:$LISTEN_PORT/readyz"; then
  echo "demo: tokenwarden not ready after 20 s; its log:" >&2
  tail -n 40 "$LOG" >&2
  exit 1
fi
say "tokenwarden running (pid $TW_PID), log $LOG"
echo "metrics: http://127.0.0.1:$LISTEN_PORT/metrics   (also /healthz, /readyz)"
if [ "$DEMO_SECONDS" -gt 0 ]; then
  echo "stopping by itself after ${DEMO_SECONDS}s"
else
  echo "Ctrl-C to stop"
fi

# ---------------------------------------------------------------- sync
say "tokenwarden sync --tenant $TENANT (strategy all: goto and teams; ringcentral inactive, zoom revoked)"
"$TW" sync --wait --tenant "$TENANT" || true
echo "stored: goto users $("${RCLI[@]}" HLEN "tenant:$TENANT:sync:goto:users"), teams users $("${RCLI[@]}" HLEN "tenant:$TENANT:sync:teams:users")"
say "the unified directory tenant:$TENANT:directory:users (one entry per person, ids at each provider)"
"${RCLI[@]}" HVALS "tenant:$TENANT:directory:users" | sort

# ---------------------------------------------------------------- watch
GOTO="tenant:$TENANT:provider:goto"
last_rt="$("${RCLI[@]}" HGET "$GOTO" refresh_token)"
rotations=0
start=$SECONDS
while :; do
  sleep "$INTERVAL"
  if ! kill -0 "$TW_PID" 2>/dev/null; then
    echo "demo: tokenwarden exited; last log lines:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
  say "t+$((SECONDS - start))s  tokenwarden status"
  "$TW" status || true
  rt="$("${RCLI[@]}" HGET "$GOTO" refresh_token)"
  expiry="$("${RCLI[@]}" HGET "$GOTO" token_expiry)"
  if [ "$rt" != "$last_rt" ]; then
    rotations=$((rotations + 1))
    echo "goto refresh_token rotated: ${last_rt:0:12}... -> ${rt:0:12}...  token_expiry $expiry  (rotation #$rotations)"
    last_rt="$rt"
  else
    echo "goto refresh_token ${rt:0:12}...  token_expiry $expiry"
  fi
  if [ "$DEMO_SECONDS" -gt 0 ] && [ $((SECONDS - start)) -ge "$DEMO_SECONDS" ]; then
    break
  fi
done

say "summary after $((SECONDS - start))s"
echo "goto refresh token rotations seen: $rotations"
echo "fake provider: $(curl -fsS "$IDP/stats?summary=1" || echo unavailable)"
echo "last events (tokenwarden:events):"
# Each entry: id, then the fields type, tenant, provider, result, detail (11 lines raw).
"${RCLI[@]}" XREVRANGE tokenwarden:events + - COUNT 6 | paste -d' ' - - - - - - - - - - - || true
echo "tokenwarden log (last 8 lines):"
tail -n 8 "$LOG"
