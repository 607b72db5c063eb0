#!/usr/bin/env python3
"""Checks every chart under charts/ with real Helm (helm-python-sdk bundles Helm's
Go SDK), offline:

- lint, with default values and with each file under the chart's ci/;
- each values file against the chart's values.schema.json, and bad values refused;
- every rendered built-in object against Kubernetes' OpenAPI schemas
  (kubernetes-validate, strict, at the chart's oldest and the newest version);
- every KEDA ScaledObject against KEDA's CRD schema (@kubernetes-models/keda, run
  by node) and its cron windows' time zones against the IANA database;
- RBAC: no ClusterRole or ClusterRoleBinding anywhere, and the Role grants nothing
  beyond the list kept beside the code that calls the API
  (cloud-cluster/src/cluster/kubernetes/rbac.txt);
- pods: non-root, read-only root filesystem, no privilege escalation, every
  capability dropped, probes, a grace period longer than the pre-stop pause;
- the rendered node and gateway configurations accepted by the real binaries
  (`--check-config`, with the environment the pods get);
- the bundled Mosquitto's rendered configuration and ACL, run by a real Mosquitto:
  each gateway reaches only the ingest topics and its own acks, each alert reader
  only its fleets, wrong passwords are refused;
- the gateway's systemd unit, read by `systemd-analyze verify`.

Usage: check_charts.py --bin-dir DIR   (DIR holds fleetline-cloud and fleetline-gateway)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zoneinfo
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHARTS = ROOT / "charts"
RBAC_LIST = ROOT / "cloud-cluster/src/cluster/kubernetes/rbac.txt"
KUBE_VERSIONS = ["1.30.0", "1.37.0"]
RELEASE, NAMESPACE = "fleet", "prod"

failures: list[str] = []
checked = {"objects": 0, "renders": 0}


def fail(msg: str) -> None:
    failures.append(msg)
    print(f"FAIL {msg}", flush=True)


def charts() -> list[Path]:
    return sorted(p for p in CHARTS.iterdir() if (p / "Chart.yaml").exists())


def values_files(chart: Path) -> list[tuple[str, dict]]:
    out = [("default", {})]
    for f in sorted((chart / "ci").glob("*.yaml")):
        out.append((f.name, yaml.safe_load(f.read_text()) or {}))
    return out


def merged(chart: Path, overrides: dict) -> dict:
    """The chart's defaults with `overrides` merged in, as Helm merges them."""

    def merge(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            out = dict(a)
            for k, v in b.items():
                out[k] = merge(a.get(k), v) if k in a else v
            return out
        return copy.deepcopy(b)

    return merge(yaml.safe_load((chart / "values.yaml").read_text()), overrides)


def render(chart: Path, values: dict) -> list[dict]:
    out = helm.Chart.load(str(chart)).render(values, name=RELEASE, namespace=NAMESPACE)
    checked["renders"] += 1
    docs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        for d in yaml.safe_load_all(text):
            if d:
                d["__template"] = path
                docs.append(d)
    return docs


def clean(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "__template"}


def check_lint(chart: Path) -> None:
    for name, values in values_files(chart):
        r = helm.lint(str(chart), values or None, strict=True, namespace=NAMESPACE)
        errs = r.get("errors") or []
        bad = [m for m in r.get("messages") or [] if m.get("severity", 0) >= 2]
        if errs or bad:
            fail(f"{chart.name} [{name}]: helm lint: {errs or bad}")


def check_values_schema(chart: Path) -> None:
    schema = json.loads((chart / "values.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for name, values in values_files(chart):
        errs = list(jsonschema.Draft202012Validator(schema).iter_errors(merged(chart, values)))
        if errs:
            fail(f"{chart.name} [{name}]: values.schema.json: {[e.message for e in errs[:5]]}")
    # The schema must refuse what the chart cannot run, and Helm must apply it.
    bad_cases = {
        "fleetline-cloud": [{"shardCount": 0}, {"storage": {"type": "nfs"}}, {"unknownKey": 1},
                            {"broker": {"mode": "bundled", "bundled": {"gateways": ["Bad_Id"]}}},
                            {"autoscaling": {"keda": {"roles": {"ingest": {"minReplicas": 1, "maxReplicas": 2,
                             "schedule": [{"name": "x", "timezone": "Europe/Berlin", "start": "8am",
                                           "end": "0 20 * * *", "replicas": 2}]}}}}}],
        "fleetline-gateway": [{"gateway": {"id": "Not Valid"}}, {"persistence": {"size": 5}}, {"typo": True}],
    }
    for case in bad_cases.get(chart.name, []):
        try:
            helm.Chart.load(str(chart)).render(case, name=RELEASE, namespace=NAMESPACE)
        except helm.HelmError:
            continue
        fail(f"{chart.name}: bad values {case} were rendered, not refused")


def check_kinds(chart: Path, name: str, docs: list[dict]) -> None:
    for d in docs:
        kind = d.get("kind")
        if d.get("apiVersion", "").startswith("keda.sh/"):
            continue
        for v in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(clean(d), v, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{chart.name} [{name}] {kind}/{d['metadata']['name']} @ {v}: {e.message} at {list(e.path)}")
            except kubernetes_validate.SchemaNotFoundError:
                fail(f"{chart.name} [{name}]: {kind} {d.get('apiVersion')} is not a known built-in kind in {v}")
        checked["objects"] += 1


def check_keda(chart: Path, name: str, docs: list[dict]) -> None:
    objs = [clean(d) for d in docs if d.get("apiVersion", "").startswith("keda.sh/")]
    if not objs:
        return
    node = shutil.which("node")
    if node is None:
        fail("node is needed to validate KEDA objects (apt-get install nodejs npm)")
        return
    r = subprocess.run([node, str(CHARTS / "tests/validate_keda.js")], input=json.dumps(objs), text=True,
                       capture_output=True, cwd=CHARTS / "tests")
    for line in r.stdout.splitlines():
        res = json.loads(line)
        if res["errors"]:
            fail(f"{chart.name} [{name}] ScaledObject/{res['name']}: KEDA CRD schema: {res['errors']}")
    if r.returncode not in (0, 1) or len(r.stdout.splitlines()) != len(objs):
        fail(f"{chart.name} [{name}]: the KEDA validator did not run: {r.stderr[-500:]}")
    for o in objs:
        checked["objects"] += 1
        for t in o["spec"]["triggers"]:
            md = t.get("metadata", {})
            if t["type"] == "cron":
                try:
                    zoneinfo.ZoneInfo(md["timezone"])
                except Exception:
                    fail(f"{chart.name} [{name}]: cron trigger {t.get('name')}: unknown time zone {md['timezone']!r}")
                for k in ("start", "end"):
                    if len(md[k].split()) != 5:
                        fail(f"{chart.name} [{name}]: cron trigger {t.get('name')}: {k} is not a 5-field cron")
                if not str(md["desiredReplicas"]).isdigit():
                    fail(f"{chart.name} [{name}]: cron desiredReplicas must be a number string")
            elif t["type"] == "metrics-api":
                if not md.get("url", "").endswith("/scaling/load?scope=cluster"):
                    fail(f"{chart.name} [{name}]: metrics-api must read /scaling/load?scope=cluster")
                # Each field of the load report with the target type that gives the rule.
                expected = {"ingest_records_per_second": "AverageValue", "backlog_bytes_avg": "AverageValue",
                            "oldest_uncommitted_seconds": "Value"}
                loc = md.get("valueLocation")
                if loc not in expected or t.get("metricType") != expected[loc]:
                    fail(f"{chart.name} [{name}]: metrics-api {loc} with {t.get('metricType')}")
                try:
                    float(md["targetValue"])
                except (KeyError, ValueError):
                    fail(f"{chart.name} [{name}]: metrics-api targetValue must be a number string")


def rbac_list() -> set[tuple[str, str, str]]:
    out = set()
    for line in RBAC_LIST.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        group, resource, *verbs = line.split()
        for v in verbs:
            out.add(("" if group == "core" else group, resource, v))
    return out


def check_rbac(chart: Path, name: str, docs: list[dict]) -> None:
    allowed = rbac_list()
    for d in docs:
        kind = d.get("kind")
        if kind in ("ClusterRole", "ClusterRoleBinding"):
            fail(f"{chart.name} [{name}]: renders a {kind} ({d['metadata']['name']}); the node needs none")
        if kind == "Role":
            for rule in d.get("rules", []):
                for g in rule.get("apiGroups", []):
                    for r in rule.get("resources", []):
                        for v in rule.get("verbs", []):
                            if v == "*" or r == "*" or g == "*" or (g, r, v) not in allowed:
                                fail(f"{chart.name} [{name}]: Role grants {g or 'core'} {r} {v}, "
                                     f"which {RBAC_LIST.relative_to(ROOT)} does not list")
        if kind == "RoleBinding" and d["roleRef"]["kind"] != "Role":
            fail(f"{chart.name} [{name}]: RoleBinding to a {d['roleRef']['kind']}")
    # Everything the code calls is granted (else the pods could not work).
    if chart.name == "fleetline-cloud" and any(d.get("kind") == "StatefulSet" for d in docs):
        granted = set()
        for d in docs:
            if d.get("kind") == "Role":
                for rule in d["rules"]:
                    for g in rule["apiGroups"]:
                        for r in rule["resources"]:
                            for v in rule["verbs"]:
                                granted.add((g, r, v))
        multi = any(d.get("kind") == "Role" for d in docs)
        if multi and allowed - granted:
            fail(f"{chart.name} [{name}]: the Role misses {sorted(allowed - granted)}")


def pod_specs(docs: list[dict]):
    for d in docs:
        if d.get("kind") in ("StatefulSet", "Deployment", "DaemonSet"):
            yield d, d["spec"]["template"]["spec"]


def check_pods(chart: Path, name: str, docs: list[dict]) -> None:
    for d, spec in pod_specs(docs):
        who = f"{chart.name} [{name}] {d['kind']}/{d['metadata']['name']}"
        psc = spec.get("securityContext", {})
        if not psc.get("runAsNonRoot") or psc.get("runAsUser", 0) == 0:
            fail(f"{who}: must run as a non-root user")
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            if not sc.get("readOnlyRootFilesystem"):
                fail(f"{who}/{c['name']}: root filesystem must be read-only")
            if sc.get("allowPrivilegeEscalation") is not False:
                fail(f"{who}/{c['name']}: allowPrivilegeEscalation must be false")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                fail(f"{who}/{c['name']}: must drop every capability")
            if c in spec["containers"] and not (c.get("readinessProbe") and c.get("livenessProbe")):
                fail(f"{who}/{c['name']}: needs readiness and liveness probes")
        labels = d["spec"]["template"]["metadata"].get("labels", {})
        if labels.get("app.kubernetes.io/name") == "fleetline-cloud":
            grace = spec.get("terminationGracePeriodSeconds", 30)
            pre = spec["containers"][0].get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            if grace < pre + 60:
                fail(f"{who}: terminationGracePeriodSeconds {grace} leaves under a minute to drain after preStop")
            env = {e["name"]: e for e in spec["containers"][0]["env"]}
            if env.get("FLEETLINE_CLOUD_NODE_ID", {}).get("value") != "$(POD_NAME)":
                fail(f"{who}: the node id must be the pod name")
            if labels.get("fleetline.io/roles", "").replace(".", ",") != env["FLEETLINE_CLOUD_ROLES"]["value"].replace(".", ","):
                fail(f"{who}: the roles label and FLEETLINE_CLOUD_ROLES differ")


def check_pdb_and_spread(chart: Path, name: str, docs: list[dict]) -> None:
    if chart.name != "fleetline-cloud":
        return
    sets = [d for d in docs if d.get("kind") == "StatefulSet"]
    pdbs = {d["metadata"]["name"] for d in docs if d.get("kind") == "PodDisruptionBudget"}
    for s in sets:
        if s["spec"]["template"]["spec"].get("volumes") and any(
            v.get("metadata", {}).get("name") == "lake" for v in s["spec"].get("volumeClaimTemplates", [])
        ):
            continue  # one node on a volume: nothing to spread or budget
        if s["metadata"]["name"] not in pdbs:
            fail(f"{chart.name} [{name}]: StatefulSet {s['metadata']['name']} has no PodDisruptionBudget")
        aff = s["spec"]["template"]["spec"].get("affinity", {}).get("podAntiAffinity", {})
        keys = [t["podAffinityTerm"]["topologyKey"] for t in aff.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
        if "topology.kubernetes.io/zone" not in keys:
            fail(f"{chart.name} [{name}]: StatefulSet {s['metadata']['name']} is not spread across zones")


def env_for(container: dict, pod_name: str, secrets: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RUST_LOG", None)
    for e in container.get("env", []):
        if "value" in e:
            v = e["value"]
            for k, val in env.items():
                v = v.replace(f"$({k})", val)
            env[e["name"]] = v
        elif "fieldRef" in e.get("valueFrom", {}):
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            env[e["name"]] = {"metadata.name": pod_name, "metadata.namespace": NAMESPACE}.get(path, "x")
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = secrets.get(e["valueFrom"]["secretKeyRef"]["key"], "s3cr3t-from-a-secret")
    return env


def check_configs(chart: Path, name: str, docs: list[dict], bin_dir: Path) -> None:
    """The configuration a pod gets, as its binary reads it."""
    maps = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}
    for d, spec in pod_specs(docs):
        c = spec["containers"][0]
        binary = {"fleetline-cloud": "fleetline-cloud", "fleetline-gateway": "fleetline-gateway"}.get(
            d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name", ""))
        if binary is None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            args = list(c.get("args", []))
            for m in c.get("volumeMounts", []):
                vol = next(v for v in spec["volumes"] if v["name"] == m["name"]) if any(
                    v["name"] == m["name"] for v in spec.get("volumes", [])) else None
                if vol and "configMap" in vol and "subPath" in m:
                    text = maps[vol["configMap"]["name"]]["data"][m["subPath"]]
                    local = tmp / m["subPath"]
                    local.write_text(text)
                    args = [str(local) if a == m["mountPath"] else a for a in args]
            env = env_for(c, f"{d['metadata']['name']}-0", {})
            for k, v in list(env.items()):
                if k.endswith("_DIR") and v.startswith("/"):
                    env[k] = str(tmp / v.lstrip("/"))
            r = subprocess.run([str(bin_dir / binary), *args, "--check-config"], env=env, capture_output=True,
                               text=True, timeout=60)
            who = f"{chart.name} [{name}] {d['kind']}/{d['metadata']['name']}"
            if r.returncode != 0:
                fail(f"{who}: {binary} --check-config refused the rendered configuration: {r.stderr.strip()[-800:]}")
                continue
            out = r.stdout
            if binary == "fleetline-cloud":
                pod = f"{d['metadata']['name']}-0"
                if f'node_id: "{pod}"' not in out:
                    fail(f"{who}: the node id is not the pod name {pod}")
                if "Kubernetes" not in out and "pvc" not in name and "single" not in name:
                    fail(f"{who}: the node is not in Kubernetes mode")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_bin() -> str | None:
    for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.path.exists(p):
            return p
    return shutil.which("mosquitto")


def check_broker_acl(bin_dir: Path) -> None:
    """The bundled broker's rendered configuration, run by a real Mosquitto."""
    chart = CHARTS / "fleetline-cloud"
    values = {"broker": {"bundled": {"gateways": ["depot-1", "depot-2"],
                                     "alertReaders": [{"username": "ops.acme", "fleets": ["acme"]}]}}}
    docs = render(chart, values)
    cm = next(d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"].endswith("-broker"))
    mosq = mosquitto_bin()
    if mosq is None or not shutil.which("mosquitto_passwd"):
        fail("mosquitto and mosquitto_passwd are needed for the broker ACL test")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Gateway logins exactly as gateways make them: from their provisioned keys.
        prov = tmp / "provisioning.toml"
        prov.write_text("format = 1\n" + "".join(
            f'[[gateways]]\nid = "{g}"\nkey = "{k * 32}"\n' for g, k in (("depot-1", "a1"), ("depot-2", "b2"))))
        r = subprocess.run([str(bin_dir / "fleetline-cloud"), "broker-logins"],
                           env={**os.environ, "FLEETLINE_PROVISIONING": str(prov)}, capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"fleetline-cloud broker-logins: {r.stderr}")
            return
        logins = dict(line.split(":", 1) for line in r.stdout.split())
        logins["fleetline-cloud"] = "cloud-password-123"
        logins["ops.acme"] = "acme-reader-password"
        passwd = tmp / "passwd"
        passwd.write_text("".join(f"{u}:{p}\n" for u, p in logins.items()))
        subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True, capture_output=True)
        port = free_port()
        conf = cm["data"]["mosquitto.conf"]
        conf = conf.replace("/mosquitto/secret/passwd", str(passwd)).replace("/mosquitto/config/acl", str(tmp / "acl"))
        conf = "\n".join(f"listener {port} 127.0.0.1" if l.startswith("listener ") else l for l in conf.splitlines())
        (tmp / "acl").write_text(cm["data"]["acl"])
        (tmp / "mosquitto.conf").write_text(conf + "\n")
        # Started as root, Mosquitto drops to its own user, which must read these.
        os.chmod(tmp, 0o755)
        for f in (passwd, tmp / "acl", tmp / "mosquitto.conf"):
            os.chmod(f, 0o644)
        broker = subprocess.Popen([mosq, "-c", str(tmp / "mosquitto.conf")], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            acl_cases(port, logins)
        finally:
            broker.terminate()
            try:
                broker.wait(5)
            except subprocess.TimeoutExpired:
                broker.kill()


def acl_cases(port: int, logins: dict[str, str]) -> None:
    def sub(user: str, topics: list[str], count: int) -> subprocess.Popen:
        args = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-u", user, "-P", logins[user],
                "-i", f"{user}-sub", "-q", "1", "-v", "-W", "3", "-C", str(count)]
        for t in topics:
            args += ["-t", t]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def pub(user: str, topic: str, msg: str, password: str | None = None) -> int:
        return subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-u", user, "-P",
                               password or logins[user], "-i", f"{user}-pub", "-q", "1", "-t", topic, "-m", msg],
                              capture_output=True, timeout=10).returncode

    def received(p: subprocess.Popen) -> list[str]:
        out, _ = p.communicate(timeout=10)
        return out.split("\n") if out else []

    # The cloud gets a gateway's bundles, on every shard's topic.
    cloud = sub("fleetline-cloud", ["fleetline/v1/ingest/#"], 2)
    time.sleep(0.5)
    pub("depot-1", "fleetline/v1/ingest/3", "bundle-a")
    pub("depot-2", "fleetline/v1/ingest/7", "bundle-b")
    got = received(cloud)
    if sorted(l for l in got if l) != ["fleetline/v1/ingest/3 bundle-a", "fleetline/v1/ingest/7 bundle-b"]:
        fail(f"ACL: the cloud did not get both gateways' bundles: {got}")

    # A gateway reads its own acks, never another's, and cannot forge one.
    mine = sub("depot-2", ["fleetline/v1/gw/depot-2/ack"], 1)
    spy = sub("depot-1", ["fleetline/v1/gw/depot-2/ack", "fleetline/v1/gw/+/ack"], 1)
    time.sleep(0.5)
    pub("depot-1", "fleetline/v1/gw/depot-2/ack", "forged")
    pub("fleetline-cloud", "fleetline/v1/gw/depot-2/ack", "real")
    got_mine, got_spy = received(mine), received(spy)
    if [l for l in got_mine if l] != ["fleetline/v1/gw/depot-2/ack real"]:
        fail(f"ACL: depot-2 should get exactly the cloud's ack, got {got_mine}")
    if any(l for l in got_spy):
        fail(f"ACL: depot-1 read depot-2's acks: {got_spy}")

    # A gateway cannot publish alerts or read anyone's bundles.
    reader = sub("ops.acme", ["fleetline/v1/alerts/acme/#", "fleetline/v1/alerts/globex/#"], 2)
    peek = sub("depot-1", ["fleetline/v1/ingest/#"], 1)
    time.sleep(0.5)
    pub("depot-1", "fleetline/v1/alerts/acme/truck-1", "fake-alert")
    pub("fleetline-cloud", "fleetline/v1/alerts/globex/van-9", "other-fleet")
    pub("fleetline-cloud", "fleetline/v1/alerts/acme/truck-1", "overspeed")
    pub("depot-2", "fleetline/v1/ingest/1", "bundle-c")
    got_reader, got_peek = received(reader), received(peek)
    if [l for l in got_reader if l] != ["fleetline/v1/alerts/acme/truck-1 overspeed"]:
        fail(f"ACL: ops.acme should get only acme's real alert, got {got_reader}")
    if any(l for l in got_peek):
        fail(f"ACL: a gateway read another's bundles: {got_peek}")

    # A wrong password is refused.
    if pub("depot-1", "fleetline/v1/ingest/1", "x", password="0" * 32) == 0:
        fail("ACL: a wrong gateway password was accepted")


def check_systemd_unit(bin_dir: Path) -> None:
    """The gateway's systemd unit, as systemd reads it (with the built binary)."""
    unit = ROOT / "packaging/systemd/fleetline-gateway.service"
    tool = shutil.which("systemd-analyze")
    if tool is None:
        fail("systemd-analyze is needed to check the gateway's unit (apt-get install systemd)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / unit.name
        local.write_text(unit.read_text().replace("/usr/local/bin/fleetline-gateway", str(bin_dir / "fleetline-gateway")))
        r = subprocess.run([tool, "verify", str(local)], capture_output=True, text=True, timeout=60)
        noise = [l for l in (r.stdout + r.stderr).splitlines() if unit.name in l or "fleetline" in l]
        if r.returncode != 0 or noise:
            fail(f"systemd-analyze verify {unit.name}: {noise or r.stderr.strip()[-500:]}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", type=Path, required=True)
    args = ap.parse_args()
    for chart in charts():
        print(f"== {chart.name}", flush=True)
        check_lint(chart)
        check_values_schema(chart)
        for name, values in values_files(chart):
            docs = render(chart, values)
            check_kinds(chart, name, docs)
            check_keda(chart, name, docs)
            check_rbac(chart, name, docs)
            check_pods(chart, name, docs)
            check_pdb_and_spread(chart, name, docs)
            check_configs(chart, name, docs, args.bin_dir)
    print("== bundled broker ACL (real Mosquitto)", flush=True)
    check_broker_acl(args.bin_dir)
    print("== the gateway's systemd unit", flush=True)
    check_systemd_unit(args.bin_dir)
    print(f"charts: {len(charts())}, renders: {checked['renders']}, objects validated: {checked['objects']}, "
          f"failures: {len(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
