#!/usr/bin/env python3
"""Offline checks of deploy/ that no packaged tool does (scripts/check-deploy.sh runs them).

  prometheusrule [--write]  deploy/kubernetes/prometheusrule.yaml holds exactly the rules of
                            deploy/prometheus/alerts.yml (--write regenerates it)
  alerts                    the eleven alert names, each with severity, summary and description,
                            and each with a firing and a silent case in alerts_test.yml
  metrics [SCRAPE [--require]]
                            every metric the alerts and the dashboard query is in SPEC 5
                            (../shared/SPEC.md when present, else the metrics reference of
                            docs/operations.md, which must then list SPEC 5 exactly); with
                            SCRAPE (a /metrics text), also which of them a daemon exports;
                            with --require, fail unless it exports every one but those of
                            NOT_IN_THIS_BUILD (the scrape must come from a daemon with
                            refreshed, failing and re-authorisation-needing providers: the
                            real-Prometheus test, tests/prometheus.rs, makes one)
  split RENDERED OUTDIR     one file per rendered object: core kinds for kubernetes-validate,
                            CRD kinds (monitoring.coreos.com) listed apart; prints the kinds
  crds FILE...              schema checks of ServiceMonitor and PrometheusRule objects
  kubernetes RENDERED       StatefulSet settings the project relies on (grace period above the
                            drain deadline, state dir on a volume claim, probes, non-root, ...)
  dockerfile FILE           multi-stage, pinned bases, non-root USER, no ADD of URLs, only the
                            tokenwarden binary copied into the runtime stage
"""

import json
import os
import re
import sys
import tomllib

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALERTS = os.path.join(ROOT, "deploy/prometheus/alerts.yml")
ALERTS_TEST = os.path.join(ROOT, "deploy/prometheus/alerts_test.yml")
PROMRULE = os.path.join(ROOT, "deploy/kubernetes/prometheusrule.yaml")
DASHBOARD = os.path.join(ROOT, "deploy/grafana/tokenwarden.json")
OPERATIONS = os.path.join(ROOT, "docs/operations.md")
SPEC = os.path.join(os.path.dirname(ROOT), "shared/SPEC.md")

ALERT_NAMES = {
    "TokenwardenTokenExpiringSoon",
    "TokenwardenTokenExpired",
    "TokenwardenReauthRequired",
    "TokenwardenRefreshFailing",
    "TokenwardenRefreshOverdue",
    "TokenwardenProviderDown",
    "TokenwardenSyncStale",
    "TokenwardenRedisDown",
    "TokenwardenJournalPending",
    "TokenwardenAbsent",
    "TokenwardenCredentialExpiring",
}

# Metrics the project exports beyond SPEC 5 (documented in docs/redis-contract.md and
# docs/operations.md): allowed in the alerts, the dashboard and the metrics reference.
EXTRA_METRICS = {"credential_expiry_timestamp_seconds"}

CRD_GROUP = "monitoring.coreos.com/"


def fail(msg):
    sys.exit(f"deploy checks: {msg}")


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


# ------------------------------------------------------------------ PrometheusRule
PROMRULE_HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by `python3 scripts/deploy_checks.py
# prometheusrule --write`; scripts/check-deploy.sh fails when the two differ. Edit alerts.yml.
"""


def promrule_object():
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "tokenwarden",
            "labels": {"app.kubernetes.io/name": "tokenwarden"},
        },
        "spec": {"groups": load_yaml(ALERTS)["groups"]},
    }


def str_presenter(dumper, data):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


def cmd_prometheusrule(args):
    want = promrule_object()
    if args[:1] == ["--write"]:
        yaml.add_representer(str, str_presenter, Dumper=yaml.SafeDumper)
        text = yaml.safe_dump(want, sort_keys=False, width=10000)
        with open(PROMRULE, "w") as f:
            f.write(PROMRULE_HEADER + text)
        print(f"wrote {os.path.relpath(PROMRULE, ROOT)}")
        return
    got = load_yaml(PROMRULE)
    if got != want:
        fail(
            "deploy/kubernetes/prometheusrule.yaml differs from deploy/prometheus/alerts.yml: "
            "run `python3 scripts/deploy_checks.py prometheusrule --write`"
        )
    n = sum(len(g["rules"]) for g in want["spec"]["groups"])
    print(f"prometheusrule.yaml: the same {n} rules as alerts.yml")


# ------------------------------------------------------------------ alerts
def rules():
    for g in load_yaml(ALERTS)["groups"]:
        yield from g["rules"]


def cmd_alerts(_args):
    names = set()
    for r in rules():
        name = r.get("alert")
        if not name:
            fail(f"a rule without an alert name: {r}")
        names.add(name)
        sev = r.get("labels", {}).get("severity")
        if sev not in ("warning", "critical"):
            fail(f"{name}: severity is {sev!r}, not warning or critical")
        ann = r.get("annotations", {})
        for key in ("summary", "description"):
            if not ann.get(key, "").strip():
                fail(f"{name}: no {key}")
        per_provider = r.get("labels", {}).get("scope") != "fleet" and "by (tenant, provider" in r["expr"]
        if per_provider:
            for label in ("$labels.tenant", "$labels.provider"):
                if label not in ann["description"]:
                    fail(f"{name}: the description does not name {label}")
    if names != ALERT_NAMES:
        fail(
            f"alert names differ: missing {sorted(ALERT_NAMES - names)}, "
            f"unexpected {sorted(names - ALERT_NAMES)}"
        )
    firing, silent = set(), set()
    for t in load_yaml(ALERTS_TEST)["tests"]:
        for case in t.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    for name in sorted(ALERT_NAMES):
        if name not in firing:
            fail(f"alerts_test.yml: no case where {name} fires")
        if name not in silent:
            fail(f"alerts_test.yml: no case where {name} stays silent")
    print(
        f"alerts.yml: {len(names)} alerts, {sum(1 for _ in rules())} rules; "
        "each fires and stays silent in alerts_test.yml"
    )


# ------------------------------------------------------------------ metrics
def spec5_table(text):
    """(name, type, meaning) rows of the first markdown table after the heading '## 5.'."""
    m = re.search(r"^## 5\..*?$(.*?)(?=^## )", text, re.S | re.M)
    if not m:
        return None
    rows = []
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        name = re.match(r"`([a-z_]+)", cells[0])
        if name:
            rows.append((name.group(1), cells[1]))
    return rows


def operations_table(text):
    """Metric names of docs/operations.md's metrics reference (`tokenwarden_...` rows before
    its first subsection, which lists what tokenwarden adds)."""
    m = re.search(r"^## Metrics reference$(.*?)(?=^##|\Z)", text, re.S | re.M)
    if not m:
        fail("docs/operations.md has no '## Metrics reference' section")
    names = re.findall(r"^\| `tokenwarden_([a-z_]+)", m.group(1), re.M)
    return names


def operations_added(text):
    """Metric names of docs/operations.md's "Added metrics" (beyond the contract)."""
    m = re.search(r"^### Added metrics$(.*?)(?=^##|\Z)", text, re.S | re.M)
    return set(re.findall(r"^\| `?(tokenwarden_[a-z_]+)", m.group(1), re.M)) if m else set()


PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "time", "vector", "scalar", "absent", "max", "min", "sum", "count",
    "avg", "rate", "increase", "irate", "histogram_quantile", "le", "max_over_time",
    "min_over_time", "topk", "bottomk", "clamp_min", "clamp_max", "label_replace", "sort",
    "sort_desc", "delta", "changes", "timestamp", "instance", "job",
}


def metric_names(expr):
    """tokenwarden_* metric names in a PromQL expression, with histogram suffixes removed."""
    out = set()
    for n in re.findall(r"\btokenwarden_[a-z_]+", expr):
        for suffix in ("_bucket", "_sum", "_count"):
            if n.endswith(suffix) and n.endswith("_seconds" + suffix):
                n = n[: -len(suffix)]
        out.add(n)
    return out


def dashboard_exprs():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    exprs = []

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k in ("expr", "query") and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(dash)
    return exprs


# Metrics queried by the dashboard or the alerts that this build does not export yet, and why.
NOT_IN_THIS_BUILD = {
    "tokenwarden_sync_runs_total": "the data sync is not part of this build",
    "tokenwarden_sync_last_success_timestamp_seconds": "the data sync is not part of this build",
    "tokenwarden_sync_records": "the data sync is not part of this build",
    "tokenwarden_sync_duration_seconds": "the data sync is not part of this build",
}


def cmd_metrics(args):
    require = "--require" in args
    args = [a for a in args if a != "--require"]
    with open(OPERATIONS) as f:
        operations = f.read()
    documented = operations_table(operations)
    added = operations_added(operations)
    if os.path.exists(SPEC):
        with open(SPEC) as f:
            table = spec5_table(f.read())
        if not table:
            fail(f"{SPEC}: no metrics table in section 5")
        known = {n for n, _ in table} | EXTRA_METRICS
        source = "SPEC 5 and the project's additions"
        if set(documented) != known:
            fail(
                "docs/operations.md's metrics reference differs from SPEC 5: missing "
                f"{sorted(known - set(documented))}, extra {sorted(set(documented) - known)}"
            )
    else:
        known = set(documented)
        source = "docs/operations.md (metrics reference)"
    known = {"tokenwarden_" + n for n in known} | added
    source += " and docs/operations.md's added metrics"
    used = {}
    for r in rules():
        for n in metric_names(r["expr"]):
            used.setdefault(n, set()).add("alerts")
    exprs = dashboard_exprs()
    if not exprs:
        fail("the dashboard has no queries")
    for e in exprs:
        for n in metric_names(e):
            used.setdefault(n, set()).add("dashboard")
    unknown = sorted(set(used) - known)
    if unknown:
        fail(f"queried but not in {source}: {unknown}")
    print(
        f"{len(used)} metrics queried by the alerts and the dashboard ({len(exprs)} panel "
        f"queries), all in {source}"
    )
    if args:
        with open(args[0]) as f:
            scrape = f.read()
        exported = set()
        for line in scrape.splitlines():
            m = re.match(r"^(tokenwarden_[a-z_]+?)(_bucket|_sum|_count)?[{ ]", line)
            if m and not line.startswith("#"):
                exported.add(m.group(1))
            m = re.match(r"^# TYPE (tokenwarden_[a-z_]+) ", line)
            if m:
                exported.add(m.group(1))
        present = sorted(n for n in used if n in exported)
        absent = sorted(n for n in used if n not in exported)
        print(f"a running daemon exports {len(present)} of them: {', '.join(present)}")
        print(
            f"not exported by this build (SPEC 5 names, or series that appear only with "
            f"data): {', '.join(absent) or 'none'}"
        )
        if require:
            missing = sorted(n for n in absent if n not in NOT_IN_THIS_BUILD)
            if missing:
                fail(
                    "queried by "
                    + "; ".join(f"{n} ({'/'.join(sorted(used[n]))})" for n in missing)
                    + " but not exported by a daemon that has data for them"
                )
            stale = sorted(n for n in NOT_IN_THIS_BUILD if n in exported)
            if stale:
                fail(f"exported now, remove from NOT_IN_THIS_BUILD: {stale}")
            print(
                "every queried metric is exported, but "
                + (", ".join(f"{n} ({NOT_IN_THIS_BUILD[n]})" for n in absent) or "none")
            )


# ------------------------------------------------------------------ rendered kustomization
def cmd_split(args):
    rendered, outdir = args
    os.makedirs(outdir, exist_ok=True)
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    core, crds = [], []
    for i, d in enumerate(docs):
        kind, name = d.get("kind"), d.get("metadata", {}).get("name")
        path = os.path.join(outdir, f"{i:02d}-{kind}-{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(d, f, sort_keys=False)
        (crds if d.get("apiVersion", "").startswith(CRD_GROUP) else core).append(path)
        print(f"  {d.get('apiVersion')} {kind} {name}")
    with open(os.path.join(outdir, "core.list"), "w") as f:
        f.write("\n".join(core) + "\n")
    with open(os.path.join(outdir, "crds.list"), "w") as f:
        f.write("\n".join(crds) + "\n")
    print(f"{len(docs)} objects: {len(core)} core, {len(crds)} custom resources")


def need(obj, path, typ, where):
    cur = obj
    for key in path.split("."):
        if not isinstance(cur, dict) or key not in cur:
            fail(f"{where}: missing {path}")
        cur = cur[key]
    if not isinstance(cur, typ):
        fail(f"{where}: {path} is {type(cur).__name__}, expected {typ.__name__}")
    return cur


DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_meta(o, where):
    name = need(o, "metadata.name", str, where)
    if not NAME.match(name) or len(name) > 253:
        fail(f"{where}: metadata.name {name!r} is not a DNS name")
    for k, v in o["metadata"].get("labels", {}).items():
        if not isinstance(v, str):
            fail(f"{where}: label {k} is not a string")


def check_servicemonitor(o, where):
    allowed_spec = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
                    "podTargetLabels", "sampleLimit", "targetLimit", "attachMetadata"}
    spec = need(o, "spec", dict, where)
    extra = set(spec) - allowed_spec
    if extra:
        fail(f"{where}: unknown spec fields {sorted(extra)}")
    sel = need(o, "spec.selector", dict, where)
    if not (sel.get("matchLabels") or sel.get("matchExpressions")):
        fail(f"{where}: spec.selector selects nothing")
    eps = need(o, "spec.endpoints", list, where)
    if not eps:
        fail(f"{where}: spec.endpoints is empty")
    allowed_ep = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout",
                  "honorLabels", "honorTimestamps", "relabelings", "metricRelabelings",
                  "tlsConfig", "bearerTokenSecret", "basicAuth", "params", "followRedirects"}
    for ep in eps:
        if not isinstance(ep, dict):
            fail(f"{where}: an endpoint is not a mapping")
        extra = set(ep) - allowed_ep
        if extra:
            fail(f"{where}: unknown endpoint fields {sorted(extra)}")
        if not isinstance(ep.get("port"), str):
            fail(f"{where}: endpoint port must be a named port (string)")
        for k in ("interval", "scrapeTimeout"):
            if k in ep and not (isinstance(ep[k], str) and DURATION.match(ep[k])):
                fail(f"{where}: endpoint {k} {ep.get(k)!r} is not a duration")
        if "path" in ep and not str(ep["path"]).startswith("/"):
            fail(f"{where}: endpoint path must start with /")


def check_prometheusrule(o, where):
    groups = need(o, "spec.groups", list, where)
    if not groups:
        fail(f"{where}: spec.groups is empty")
    for g in groups:
        gname = need(g, "name", str, where)
        for r in need(g, "rules", list, f"{where} group {gname}"):
            w = f"{where} group {gname} rule {r.get('alert') or r.get('record')}"
            if ("alert" in r) == ("record" in r):
                fail(f"{w}: exactly one of alert and record")
            need(r, "expr", str, w)
            extra = set(r) - {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
            if extra:
                fail(f"{w}: unknown fields {sorted(extra)}")
            if "for" in r and not (isinstance(r["for"], str) and DURATION.match(r["for"])):
                fail(f"{w}: for {r['for']!r} is not a duration")
            for k in ("labels", "annotations"):
                for lk, lv in r.get(k, {}).items():
                    if not isinstance(lv, str):
                        fail(f"{w}: {k}.{lk} is not a string")


def cmd_crds(args):
    for path in args:
        o = load_yaml(path)
        where = f"{o.get('kind')} {o.get('metadata', {}).get('name')}"
        if o.get("apiVersion") != "monitoring.coreos.com/v1":
            fail(f"{where}: apiVersion {o.get('apiVersion')!r}")
        check_meta(o, where)
        if o["kind"] == "ServiceMonitor":
            check_servicemonitor(o, where)
        elif o["kind"] == "PrometheusRule":
            check_prometheusrule(o, where)
        else:
            fail(f"{where}: no schema check for this kind")
        print(f"{where}: ok")


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def cmd_kubernetes(args):
    with open(args[0]) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    if "Deployment" in by_kind:
        fail("a Deployment is rendered: tokenwarden runs as a StatefulSet")
    (sts,) = by_kind["StatefulSet"]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    with open(os.path.join(ROOT, "config/tokenwarden.toml"), "rb") as f:
        drain = tomllib.load(f)["shutdown"]["drain_deadline_secs"]
    checks = [
        (spec.get("replicas") == 2, "replicas: 2"),
        (pod.get("terminationGracePeriodSeconds", 30) > drain,
         f"terminationGracePeriodSeconds above the drain deadline ({drain}s)"),
        (pod.get("enableServiceLinks") is False, "enableServiceLinks: false"),
        (pod.get("securityContext", {}).get("runAsNonRoot") is True, "runAsNonRoot"),
        (c.get("securityContext", {}).get("readOnlyRootFilesystem") is True,
         "readOnlyRootFilesystem"),
        (c.get("securityContext", {}).get("capabilities", {}).get("drop") == ["ALL"],
         "capabilities drop ALL"),
        (c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz",
         "liveness /healthz"),
        (c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz",
         "readiness /readyz"),
        (bool(c.get("resources", {}).get("requests")) and bool(c.get("resources", {}).get("limits")),
         "resources"),
    ]
    for ok, what in checks:
        if not ok:
            fail(f"StatefulSet: {what}")
    env = env_of(c)
    state = env.get("TOKENWARDEN_STATE_DIR", {}).get("value")
    claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    if not state or mounts.get(state) not in claims:
        fail("StatefulSet: TOKENWARDEN_STATE_DIR is not a volumeClaimTemplates mount")
    key = env.get("TOKENWARDEN_JOURNAL_KEY_FILE", {}).get("value", "")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    key_dir = os.path.dirname(key)
    if "secret" not in vols.get(mounts.get(key_dir, ""), {}):
        fail("StatefulSet: TOKENWARDEN_JOURNAL_KEY_FILE is not in a mounted Secret")
    headless = [s for s in by_kind.get("Service", []) if s["spec"].get("clusterIP") == "None"]
    if not any(s["metadata"]["name"] == spec.get("serviceName") for s in headless):
        fail("StatefulSet: serviceName is not a headless Service")
    for kind in ("ConfigMap", "Secret", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule"):
        if kind not in by_kind:
            fail(f"no {kind} rendered")
    print(
        f"StatefulSet: 2 replicas, grace {pod.get('terminationGracePeriodSeconds')}s > drain "
        f"{drain}s, journal at {state} on a volume claim, key from a Secret"
    )


# ------------------------------------------------------------------ Dockerfile
def cmd_dockerfile(args):
    path = args[0]
    with open(path) as f:
        text = f.read()
    lines = []
    for raw in re.sub(r"\\\n", " ", text).splitlines():
        s = raw.strip()
        if s and not s.startswith("#"):
            lines.append(s)
    froms = [l for l in lines if l.upper().startswith("FROM ")]
    if len(froms) < 2:
        fail(f"{path}: not a multi-stage build ({len(froms)} FROM lines)")
    for l in froms:
        image = l.split()[1]
        if ":" not in image and "@" not in image:
            fail(f"{path}: {l!r}: the base image has no tag")
        if image.endswith(":latest"):
            fail(f"{path}: {l!r}: ':latest' is not a pinned base")
    last = max(i for i, l in enumerate(lines) if l.upper().startswith("FROM "))
    runtime = lines[last:]
    users = [l.split(None, 1)[1] for l in runtime if l.upper().startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        fail(f"{path}: the runtime stage does not end as a non-root USER")
    for l in lines:
        if l.upper().startswith("ADD ") and re.search(r"https?://", l):
            fail(f"{path}: {l!r}: ADD of a URL")
    copies = [l for l in runtime if l.upper().startswith("COPY ")]
    if not copies or not all("--from=" in l for l in copies):
        fail(f"{path}: the runtime stage copies something that is not a build artefact")
    binaries = [l for l in copies if "/tokenwarden" in l]
    if len(binaries) != 1 or "fake" in " ".join(copies):
        fail(f"{path}: the runtime stage must copy only the tokenwarden binary")
    build = " ".join(lines[:last])
    if "--locked" not in build or "--bin tokenwarden" not in build:
        fail(f"{path}: the build stage must run cargo build --release --locked --bin tokenwarden")
    print(f"{os.path.relpath(path, ROOT)}: {len(froms)} stages ({', '.join(l.split()[1] for l in froms)}), runtime user {users[-1]}")


COMMANDS = {
    "prometheusrule": cmd_prometheusrule,
    "alerts": cmd_alerts,
    "metrics": cmd_metrics,
    "split": cmd_split,
    "crds": cmd_crds,
    "kubernetes": cmd_kubernetes,
    "dockerfile": cmd_dockerfile,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    COMMANDS[sys.argv[1]](sys.argv[2:])
