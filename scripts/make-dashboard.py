#!/usr/bin/env python3
"""Writes deploy/grafana/tether.json, the Grafana dashboard. Edit here, then run it again."""
import json
import os

DS = {"type": "prometheus", "uid": "${datasource}"}
panels = []


def panel(title, exprs, unit="short", kind="timeseries", w=12, h=8, desc=""):
    i = len(panels)
    panels.append({
        "id": i + 1,
        "title": title,
        "description": desc,
        "type": kind,
        "datasource": DS,
        "gridPos": {"x": (i % 2) * 12 if w == 12 else 0, "y": (i // 2) * h, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {"refId": chr(65 + j), "datasource": DS, "expr": e, "legendFormat": l}
            for j, (e, l) in enumerate(exprs)
        ],
    })


panel("Nodes without a tunnel", [('count(tether_tunnels_up{job="tether-agent"} == 0) or vector(0)', "nodes")],
      kind="stat", desc="Agents that hold no tunnel at all: their kubelet cannot reach the API.")
panel("Servers with an unhealthy upstream", [('count(tether_upstream_healthy{job="tether-server"} == 0) or vector(0)', "servers")],
      kind="stat")
panel("Agent tunnels per server", [('sum by (instance) (tether_tunnels_up{job="tether-server"})', "{{instance}}")])
panel("Tunnels by transport (agents)", [('sum by (transport) (tether_tunnels_by_transport{job="tether-agent"})', "{{transport}}")])
panel("Open streams", [('sum by (job) (tether_streams_open)', "{{job}}")])
panel("New streams per second", [('sum by (job) (rate(tether_streams_total[5m]))', "{{job}}")], unit="ops")
panel("Tunnel throughput", [
    ('sum by (job) (rate(tether_tunnel_bytes_sent_total[5m]))', "{{job}} sent"),
    ('sum by (job) (rate(tether_tunnel_bytes_received_total[5m]))', "{{job}} received"),
], unit="Bps")
panel("Stream open failures by reason (agents)", [
    ('sum by (reason) (rate(tether_stream_open_failures_total{job="tether-agent"}[5m]))', "{{reason}}")], unit="ops")
panel("Failovers per second (agents)", [('sum by (instance) (rate(tether_failovers_total{job="tether-agent"}[5m]))', "{{instance}}")],
      unit="ops")
panel("Limit hits (servers)", [('sum by (limit) (rate(tether_limit_hits_total{job="tether-server"}[5m]))', "{{limit}}")],
      unit="ops")
panel("Peer links healthy (servers)", [('tether_peer_healthy{job="tether-server"}', "{{instance}} to {{peer}}")])
panel("Days until certificate expiry", [('min by (instance, job) ((tether_certificate_expiry_timestamp_seconds - time()) / 86400)', "{{job}} {{instance}}")],
      unit="d")

dashboard = {
    "title": "tether",
    "uid": "tether",
    "description": "tether reverse tunnel broker: agents (job tether-agent) and servers (job tether-server)",
    "tags": ["tether", "kubernetes"],
    "timezone": "",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {"list": [{
        "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
        "current": {}, "hide": 0,
    }]},
    "annotations": {"list": []},
    "panels": panels,
}
here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "..", "deploy", "grafana", "tether.json")
with open(out, "w") as f:
    json.dump(dashboard, f, indent=2)
    f.write("\n")
print("wrote", os.path.normpath(out))
