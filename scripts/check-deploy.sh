#!/usr/bin/env bash
# Validates the files under deploy/ offline:
#   - deploy/systemd/tokenwarden.service: `systemd-analyze verify` (any warning fails) and the
#     offline security score;
#   - deploy/kubernetes/*.yaml: `kubernetes-validate --strict` (schemas bundled, no cluster);
#     the ConfigMap's providers.toml equals config/providers.toml and its tokenwarden.toml
#     passes `tokenwarden check-config`; grace periods exceed the drain deadline;
#   - deploy/prometheus: `promtool check rules` and `promtool test rules`.
# Installs what is missing (systemd, prometheus for promtool, kubernetes-validate).
# Uses target/release/tokenwarden (built when absent), or $TOKENWARDEN_BIN.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export DEBIAN_FRONTEND=noninteractive
export PIP_ROOT_USER_ACTION=ignore

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}
APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" -eq 0 ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
  as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
step() { # step NAME command...: runs it and prints how long it took
  local name=$1 t0=$SECONDS; shift
  echo "--- $name"
  "$@"
  echo "--- $name: ok ($((SECONDS - t0))s)"
}

TMP="$(mktemp -d "${TMPDIR:-/tmp}/tokenwarden-deploy.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

BIN="${TOKENWARDEN_BIN:-$ROOT/target/release/tokenwarden}"
if [ ! -x "$BIN" ]; then
  cargo build --release --quiet --bin tokenwarden
fi

# ------------------------------------------------------------------ tools
install_tools() {
  if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "installing systemd (for systemd-analyze)"
    apt_install systemd
  fi
  if ! command -v promtool >/dev/null 2>&1; then
    # promtool ships in Debian's prometheus package.
    if ! apt-cache policy prometheus 2>/dev/null | grep -q 'Candidate: [0-9]'; then
      as_root apt-get update -qq; APT_UPDATED=1
    fi
    echo "installing prometheus (for promtool)"
    apt_install prometheus
  fi
  if ! command -v kubernetes-validate >/dev/null 2>&1; then
    echo "installing kubernetes-validate (pip)"
    if ! python3 -m pip --version >/dev/null 2>&1; then apt_install python3-pip; fi
    # Debian's own python3 refuses plain pip installs: retry with the override.
    python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate ||
      python3 -m pip install --quiet --disable-pip-version-check --break-system-packages kubernetes-validate
  fi
  echo "systemd-analyze: $(systemd-analyze --version | head -n1)"
  echo "promtool: $(promtool --version 2>&1 | head -n1)"
  echo "kubernetes-validate: $(kubernetes-validate --version 2>&1 | head -n1)"
}

# ------------------------------------------------------------------ systemd
check_systemd() {
  # verify wants ExecStart's binary to exist: check a copy of the unit that points at a copy
  # of the release binary (same name, so the unit name is unchanged).
  mkdir -p "$TMP/systemd/bin"
  cp "$BIN" "$TMP/systemd/bin/tokenwarden"
  sed "s#^ExecStart=/usr/local/bin/tokenwarden #ExecStart=$TMP/systemd/bin/tokenwarden #" \
    deploy/systemd/tokenwarden.service >"$TMP/systemd/tokenwarden.service"
  grep -q "^ExecStart=$TMP/systemd/bin/tokenwarden run " "$TMP/systemd/tokenwarden.service" || {
    echo "ExecStart is not /usr/local/bin/tokenwarden run ..." >&2; return 1; }
  local out rc=0
  # Warnings (unknown keys, bad values) exit 0: any output at all is a failure.
  out="$(systemd-analyze verify "$TMP/systemd/tokenwarden.service" 2>&1)" || rc=$?
  if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
    echo "systemd-analyze verify (exit $rc):" >&2
    echo "$out" >&2
    return 1
  fi
  systemd-analyze security --offline=true "$TMP/systemd/tokenwarden.service" 2>&1 |
    grep 'Overall exposure level' || true
}

# ------------------------------------------------------------------ kubernetes
check_kubernetes() {
  kubernetes-validate --strict deploy/kubernetes/*.yaml
  # The ConfigMap's config must be one tokenwarden accepts, with the repository's catalog.
  python3 - "$TMP/etc" <<'EOF'
import os, sys, yaml
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
with open("deploy/kubernetes/configmap.yaml") as f:
    cm = yaml.safe_load(f)
for name in ("tokenwarden.toml", "providers.toml"):
    if name not in cm.get("data", {}):
        sys.exit(f"configmap.yaml: data has no {name}")
    with open(os.path.join(out, name), "w") as f:
        f.write(cm["data"][name])
with open("config/providers.toml") as f:
    if f.read() != cm["data"]["providers.toml"]:
        sys.exit("configmap.yaml: providers.toml differs from config/providers.toml")
EOF
  env -u TOKENWARDEN_REDIS_URL -u TOKENWARDEN_LISTEN -u TOKENWARDEN_CONFIG \
    "$BIN" check-config --config "$TMP/etc/tokenwarden.toml"
}

# ------------------------------------------------------------------ consistency
check_grace() {
  # In-flight refreshes get drain_deadline_secs after SIGTERM: both stop timeouts must exceed it.
  python3 - "$TMP/etc/tokenwarden.toml" <<'EOF'
import re, sys, tomllib, yaml
drain = tomllib.load(open("config/tokenwarden.toml", "rb"))["shutdown"]["drain_deadline_secs"]
drain = tomllib.load(open(sys.argv[1], "rb")).get("shutdown", {}).get("drain_deadline_secs", drain)
unit = open("deploy/systemd/tokenwarden.service").read()
m = re.search(r"^TimeoutStopSec=(\d+)s?$", unit, re.M)
stop = int(m.group(1)) if m else 0
grace = yaml.safe_load(open("deploy/kubernetes/deployment.yaml"))["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
print(f"drain deadline {drain}s, TimeoutStopSec {stop}s, terminationGracePeriodSeconds {grace}s")
if not (stop > drain and grace > drain):
    sys.exit("a stop timeout does not exceed the drain deadline")
EOF
}

# ------------------------------------------------------------------ prometheus
check_prometheus() {
  promtool check rules deploy/prometheus/alerts.yml
  (cd deploy/prometheus && promtool test rules alerts_test.yml)
}

step "install tools" install_tools
step "systemd unit" check_systemd
step "kubernetes manifests" check_kubernetes
step "stop timeouts vs drain deadline" check_grace
step "prometheus rules" check_prometheus
echo "deploy files: ok"
