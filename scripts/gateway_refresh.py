#!/usr/bin/env python3
"""Reference implementation of a gateway refreshing tokens beside tokenwarden.

This is the protocol of docs/gateway-integration.md in code (redis-py and the standard
library only), small enough to copy into the gateway's provider manager:

1. take the lock `tenant:{t}:provider:{p}:lock` with `SET owner NX PX ttl`;
2. read the record under the lock; refresh only if it is still due;
3. respect a live reservation `...:inflight` of a tokenwarden replica for the refresh token
   it holds (that replica may hold an unconfirmed answer for it), then set one of its own:
   `replica|sha1(refresh_token)|start_ms`;
4. call the token endpoint exactly once;
5. write back with the compare-and-set script: only `access_token`, `token_expiry`,
   `updated_at` and (when the provider returned one) `refresh_token`, and only where
   `refresh_token` still holds the value the refresh started from; never a whole record;
6. delete the reservation and release the lock with compare-and-delete scripts (a call that
   may still be in flight keeps both: they expire).

The Lua scripts below are the same text tokenwarden runs (CI checks that they stay equal to
`src/refresh/writeback.rs`, `src/lock.rs` and `src/refresh/reserve.rs`).

Run as a loop, as the tests and CI do:

    gateway_refresh.py --redis redis://127.0.0.1:6379/0 --tenant acme \
        --providers goto,zoom --seconds 30 --min-remaining 3

It refreshes each provider whose token expires within `--min-remaining` seconds, prints one
JSON line per outcome other than "not due" with `--verbose`, and a JSON summary at the end.
"""

import argparse
import base64
import hashlib
import json
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone

import redis

# src/refresh/writeback.rs
COMPARE_AND_SET = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local current = redis.call('HGET', KEYS[1], 'refresh_token')
if current == false then current = '' end
if current ~= ARGV[1] then
  return 0
end
-- One HSET: one change event for the whole write-back.
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'access_token', ARGV[2], 'token_expiry', ARGV[4], 'updated_at', ARGV[5], 'refresh_token', ARGV[3])
else
  redis.call('HSET', KEYS[1], 'access_token', ARGV[2], 'token_expiry', ARGV[4], 'updated_at', ARGV[5])
end
return 1
"""

# src/lock.rs
RELEASE = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# src/refresh/reserve.rs
COMPARE_DELETE = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

CALL_TIMEOUT_S = 10
LOCK_TTL_MS = 2 * CALL_TIMEOUT_S * 1000 + 10_000
RESERVATION_TTL_MS = 120_000


def sha1(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()


def like(old: str, t: datetime) -> str:
    """Aware datetime `t` written the way the field's current value `old` is written."""
    old = (old or "").strip()
    if not old:
        return t.isoformat()  # ISO with +00:00
    try:
        v = float(old)
    except ValueError:
        cur = datetime.fromisoformat(old.replace("Z", "+00:00"))
        sep = " " if len(old) > 10 and old[10] == " " else "T"
        if cur.tzinfo is None:
            return t.astimezone(timezone.utc).replace(tzinfo=None).isoformat(sep)
        return t.astimezone(cur.tzinfo).isoformat(sep)
    if v > 1e11:
        return str(int(t.timestamp() * 1000))
    return str(t.timestamp()) if "." in old else str(int(t.timestamp()))


def parse_expiry(value: str):
    """`token_expiry` as an aware datetime; None when empty (refresh now)."""
    value = (value or "").strip()
    if not value:
        return None
    try:
        v = float(value)
        return datetime.fromtimestamp(v / 1000 if v > 1e11 else v, timezone.utc)
    except ValueError:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def call_token_endpoint(record: dict) -> dict:
    """One `grant_type=refresh_token` call, client authentication by HTTP Basic (RFC 6749
    2.3.1: id and secret form-urlencoded, then base64). Raises TimeoutError when the request
    may have reached the provider without its answer reaching us."""
    user = urllib.parse.quote(record["client_id"], safe="")
    password = urllib.parse.quote(record["client_secret"], safe="")
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    body = urllib.parse.urlencode(
        {"grant_type": "refresh_token", "refresh_token": record["refresh_token"]}
    ).encode()
    req = urllib.request.Request(
        record["token_url"],
        data=body,
        headers={
            "Authorization": f"Basic {basic}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=CALL_TIMEOUT_S) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            error = json.loads(e.read()).get("error", "")
        except ValueError:
            error = ""
        raise ProviderError(e.code, error) from None
    except (TimeoutError, urllib.error.URLError) as e:
        if isinstance(getattr(e, "reason", e), TimeoutError) or isinstance(e, TimeoutError):
            raise TimeoutError("token call timed out") from None
        raise ProviderError(0, "connection") from None


class ProviderError(Exception):
    def __init__(self, status: int, error: str):
        super().__init__(f"HTTP {status} {error}")
        self.status = status
        self.error = error


class Gateway:
    def __init__(self, url: str, replica: str, min_remaining: float):
        self.r = redis.Redis.from_url(url, decode_responses=True)
        self.cas = self.r.register_script(COMPARE_AND_SET)
        self.release = self.r.register_script(RELEASE)
        self.compare_delete = self.r.register_script(COMPARE_DELETE)
        self.replica = replica
        self.min_remaining = timedelta(seconds=min_remaining)

    def due(self, record: dict) -> bool:
        expiry = parse_expiry(record.get("token_expiry", ""))
        return expiry is None or expiry - datetime.now(timezone.utc) <= self.min_remaining

    def refresh(self, tenant: str, provider: str) -> str:
        """One refresh under the protocol; returns what happened (no secret)."""
        key = f"tenant:{tenant}:provider:{provider}"
        lock, inflight = f"{key}:lock", f"{key}:inflight"
        owner = f"{self.replica}:{secrets.token_hex(8)}"
        if not self.r.set(lock, owner, nx=True, px=LOCK_TTL_MS):
            return "locked"
        keep_lock = False
        reservation = None
        try:
            # Only the fields the refresh needs: nothing read here is ever written back whole.
            fields = ["refresh_token", "token_expiry", "updated_at", "client_id",
                      "client_secret", "token_url"]
            record = dict(zip(fields, self.r.hmget(key, fields)))
            if record["refresh_token"] is None:
                return "gone"
            if not self.due(record):
                return "not_due"  # refreshed by someone else meanwhile
            expected = record["refresh_token"]
            held = self.r.get(inflight)
            if held:
                replica, _, rest = held.partition("|")
                token_hash = rest.partition("|")[0]
                if token_hash == sha1(expected) and self.r.exists(f"tokenwarden:replica:{replica}"):
                    # A live tokenwarden replica may hold an unconfirmed answer for this
                    # refresh token: it is spent; wait for the replica's write-back.
                    return "reserved"
            reservation = f"{self.replica}|{sha1(expected)}|{int(time.time() * 1000)}"
            self.r.set(inflight, reservation, px=RESERVATION_TTL_MS)
            try:
                answer = call_token_endpoint(record)
            except TimeoutError:
                keep_lock = True  # the provider may have spent the token: let both expire
                return "timeout"
            except ProviderError as e:
                if self.r.hget(key, "refresh_token") != expected:
                    return "conflict"
                return "invalid_grant" if e.error == "invalid_grant" else "error"
            now = datetime.now(timezone.utc)
            expiry = now + timedelta(seconds=int(answer.get("expires_in", 3600)))
            n = self.cas(keys=[key], args=[
                expected,
                answer["access_token"],
                answer.get("refresh_token", ""),  # "" keeps the stored one
                like(record.get("token_expiry") or "", expiry),
                like(record.get("updated_at") or "", now),
            ])
            return {1: "refreshed", 0: "conflict", -1: "gone"}.get(n, "error")
        finally:
            if not keep_lock:
                if reservation:
                    self.compare_delete(keys=[inflight], args=[reservation])
                self.release(keys=[lock], args=[owner])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--tenant", required=True)
    ap.add_argument("--providers", required=True, help="comma-separated provider names")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long to run")
    ap.add_argument("--min-remaining", type=float, default=300.0,
                    help="refresh when the token expires within this many seconds")
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--replica", default=f"gateway-{secrets.token_hex(4)}")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    gw = Gateway(args.redis, args.replica, args.min_remaining)
    providers = [p for p in args.providers.split(",") if p]
    counts: dict = {}
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        for p in providers:
            key = f"tenant:{args.tenant}:provider:{p}"
            if not gw.due({"token_expiry": gw.r.hget(key, "token_expiry") or ""}):
                continue
            outcome = gw.refresh(args.tenant, p)
            counts[outcome] = counts.get(outcome, 0) + 1
            if args.verbose and outcome != "not_due":
                print(json.dumps({"provider": p, "outcome": outcome}), flush=True)
        time.sleep(args.interval)
    print(json.dumps({"summary": counts}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
