"""Routing you can watch: the /metrics endpoint of a real server after real routes, the README's
metric table and the Grafana dashboard checked against it, and the decision log."""

from __future__ import annotations

import json
import math
import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from seqr_client import InvalidArgumentError, RouterClient
from seqr_server.auth import append_token, new_token_entry

from .conftest import LIB, activations, populate

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "seqr-router.json"


def _hidden(world, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {i: rng.standard_normal(x.shape).astype(np.float32) for i, x in world.hidden.items()}


def scrape(handles) -> list:
    with urllib.request.urlopen(f"http://127.0.0.1:{handles.metrics_port}/metrics", timeout=10) as r:
        return list(text_string_to_metric_families(r.read().decode()))


def samples(families, name: str, **labels) -> list:
    return [s for f in families for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def value(families, name: str, **labels) -> float:
    found = samples(families, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0].value


def metric_families(families) -> list:
    """The metrics themselves: the text format also lists each counter's and histogram's
    ``<name>_created`` series as a gauge family of its own."""
    names = {f.name for f in families}
    return [f for f in families if not (f.name.endswith("_created") and f.name[:-len("_created")] in names)]


def exported_names(families) -> dict[str, str]:
    """Metric name as documented (counters with _total) -> type."""
    return {f.name + ("_total" if f.type == "counter" else ""): f.type for f in metric_families(families)}


@pytest.fixture(scope="module")
def watched(world, tmp_path_factory):
    """A real server with metrics on, LIB populated; routes before and after a Calibrate."""
    from .conftest import launch
    h = launch(tmp_path_factory.mktemp("watched") / "data", metrics_port=0)
    c = populate(h, world)
    before = [c.route(LIB, activations(world, _hidden(world, s)), top_k=2) for s in range(3)]
    t0 = time.time()
    c.calibrate([activations(world, _hidden(world, s)) for s in range(10, 14)], library=LIB)
    t1 = time.time()
    after = [c.route(LIB, activations(world, _hidden(world, s)), top_k=1) for s in range(20, 24)]
    with pytest.raises(InvalidArgumentError):
        c.route(LIB, {"model.layers.0.self_attn.q_proj": np.ones((2, 5), np.float32)})
    families = scrape(h)
    yield h, c, before, after, (t0, t1), families
    c.close()
    h.stop(grace=1.0)


def test_margin_gap_fallback_and_recheck_metrics_follow_the_decisions(watched):
    _, _, before, after, _, fam = watched
    routes = before + after
    assert all(r.fallback for r in before) and not any(r.fallback for r in after)
    assert value(fam, "seqr_route_fallback_total", library=LIB) == len(before)
    margins = [r.margin for r in routes]
    assert all(math.isfinite(m) for m in margins)
    assert value(fam, "seqr_route_margin_count", library=LIB) == len(routes)
    assert value(fam, "seqr_route_margin_sum", library=LIB) == pytest.approx(sum(margins), rel=1e-9)
    le_01 = value(fam, "seqr_route_margin_bucket", library=LIB, le="0.1")
    assert le_01 == sum(m <= 0.1 for m in margins)
    gaps = [r.margin / abs(r.best.score) for r in routes]
    assert value(fam, "seqr_route_score_gap_ratio_sum", library=LIB) == pytest.approx(sum(gaps), rel=1e-6)
    rechecked = sum(r.rechecked for r in routes)
    if rechecked:
        assert value(fam, "seqr_route_rechecked_total", library=LIB) == rechecked
    else:
        assert not samples(fam, "seqr_route_rechecked_total", library=LIB)
    wins = {}
    for r in routes:
        wins[r.best.name] = wins.get(r.best.name, 0) + 1
    for name, n in wins.items():
        assert value(fam, "seqr_route_choices_total", library=LIB, adapter=name) == n


def test_library_version_and_calibration_age_are_exported(watched):
    h, c, _, _, (t0, t1), fam = watched
    info = c.describe(LIB)
    assert value(fam, "seqr_library_version", library=LIB) == info.version
    assert value(fam, "seqr_library_adapters", library=LIB) == len(info.adapters)
    at = value(fam, "seqr_library_calibrated_timestamp_seconds", library=LIB)
    assert t0 <= at <= t1
    assert value(fam, "seqr_library_calibration_sequences", library=LIB) == 4
    age = value(fam, "seqr_library_calibration_age_seconds", library=LIB)
    assert 0 <= age <= time.time() - t0
    later = value(scrape(h), "seqr_library_calibration_age_seconds", library=LIB)
    assert later >= age                                    # computed when scraped, not frozen


def test_calibration_time_survives_a_restart(world, start_server, tmp_path):
    h = start_server(tmp_path / "d", metrics_port=0)
    with populate(h, world) as c:
        fam = scrape(h)
        assert not samples(fam, "seqr_library_calibration_age_seconds", library=LIB)   # never calibrated
        c.calibrate([activations(world)], library=LIB)
    at = value(scrape(h), "seqr_library_calibrated_timestamp_seconds", library=LIB)
    h.stop(grace=1.0)
    h2 = start_server(tmp_path / "d", metrics_port=0)
    assert value(scrape(h2), "seqr_library_calibrated_timestamp_seconds", library=LIB) == at


def _readme_metric_table() -> dict[str, tuple[str, str]]:
    """README rows ``| `name` | type | labels | meaning |`` -> (type, labels)."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"^\|\s*`(seqr_\w+)`\s*\|\s*(\w+)\s*\|([^|]*)\|", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3).strip())
    return rows


def test_readme_documents_every_exported_metric_with_type_and_labels(watched):
    fam = watched[-1]
    exported = exported_names(fam)
    table = _readme_metric_table()
    assert set(table) == set(exported), (set(exported) - set(table), set(table) - set(exported))
    for f in metric_families(fam):
        name = f.name + ("_total" if f.type == "counter" else "")
        kind, labels = table[name]
        assert kind == f.type, name
        documented = {x.strip(" `") for x in labels.split(",") if x.strip(" `—-")}
        if f.samples:     # a labelled metric nothing has touched yet (e.g. no re-check) has none
            assert {k for s in f.samples for k in s.labels if k != "le"} == documented, name


def _queries(node) -> list[str]:
    """Every PromQL string in a dashboard: panel targets (rows included) and template queries."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "definition") and isinstance(v, str):
                out.append(v)
            elif k == "query" and isinstance(v, str) and "(" in v:
                out.append(v)
            else:
                out += _queries(v)
    elif isinstance(node, list):
        for v in node:
            out += _queries(v)
    return out


def test_grafana_dashboard_queries_only_metrics_the_server_exports(watched):
    fam = watched[-1]
    dash = json.loads(DASHBOARD.read_text())
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",)}
    # Every series the server declares (HELP/TYPE), also those nothing has incremented yet.
    sample_names = {f.name + x for f in metric_families(fam) for x in suffixes[f.type]}
    assert {s.name for f in fam for s in f.samples} <= sample_names
    queries = _queries(dash)
    used = {n for q in queries for n in re.findall(r"\bseqr_[a-z0-9_]+", q)}
    assert used and used <= sample_names, sorted(used - sample_names)
    for must in ("seqr_route_margin_bucket", "seqr_route_score_gap_ratio_bucket", "seqr_route_fallback_total",
                 "seqr_route_rechecked_total", "seqr_library_version", "seqr_library_calibration_age_seconds"):
        assert must in used
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "library"}


# ---------------------------------------------------------------------------- decision log
RECORD_KEYS = {"time", "library", "version", "caller", "top_k", "margin", "method", "normalisation",
               "fallback", "rechecked", "form", "ms"}


def test_decision_log_records_each_decision_for_its_caller_and_no_activations(world, start_server, tmp_path):
    tokens = tmp_path / "tokens.json"
    admin, entry = new_token_entry(name="ops", roles=["admin"])
    append_token(tokens, entry)
    host_a, entry = new_token_entry(name="host-a", roles=["route"], adapters=["shared-*"])
    append_token(tokens, entry)
    log_file = tmp_path / "decisions.jsonl"
    h = start_server(tmp_path / "d", tokens_file=tokens, decision_log=str(log_file))
    ops = populate(h, world, token=admin)
    # The log is the operator's: it records the library version the decision was scored on,
    # not the restricted caller's view version (which hides changes it cannot see).
    version = ops.describe(LIB).version
    ops.close()
    with RouterClient(h.target, token=host_a) as c:
        got = [c.route(LIB, activations(world, _hidden(world, s)), top_k=2) for s in range(3)]
        got.append(c.route(LIB, activations(world), top_k=1, candidates=["shared-a1"]))  # one candidate
    lines = log_file.read_text().splitlines()
    assert oct(log_file.stat().st_mode & 0o777) == "0o600"
    assert len(lines) == len(got)
    for line, r in zip(lines, got):
        rec = json.loads(line)
        assert set(rec) == RECORD_KEYS
        assert rec["library"] == LIB and rec["caller"] == "host-a" and rec["version"] == version
        assert r.library_version <= version
        assert [(x["id"], x["name"]) for x in rec["top_k"]] == [(ch.adapter_id, ch.name) for ch in r.choices]
        assert [x["score"] for x in rec["top_k"]] == pytest.approx([ch.score for ch in r.choices], rel=1e-12)
        assert rec["margin"] == (pytest.approx(r.margin, rel=1e-12) if math.isfinite(r.margin) else None)
        assert rec["form"] == "activations" and rec["time"].endswith("+00:00")
        assert len(line) < 1000          # ids, names and a few scores: never a tensor
    assert json.loads(lines[-1])["margin"] is None


def test_decision_log_to_stdout(world, start_server, tmp_path, capsys):
    h = start_server(tmp_path / "d", decision_log="-")
    with populate(h, world) as c:
        capsys.readouterr()
        r = c.route(LIB, activations(world), top_k=3)
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["caller"] == "anonymous (open server)"
    assert [x["id"] for x in rec["top_k"]] == [ch.adapter_id for ch in r.choices]


def test_an_unwritable_decision_log_refuses_to_start(tmp_path):
    from seqr_core.errors import FailedPreconditionError
    from .conftest import launch
    with pytest.raises(FailedPreconditionError) as ei:
        launch(tmp_path / "d", decision_log=str(tmp_path / "no-such-dir" / "log.jsonl"))
    assert ei.value.field == "decision_log"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_never_stops_routing_and_is_counted(world, start_server, tmp_path):
    h = start_server(tmp_path / "d", metrics_port=0, decision_log="/dev/full")   # every write: ENOSPC
    with populate(h, world) as c:
        routed = [c.route(LIB, activations(world, _hidden(world, s))) for s in range(3)]
    assert all(r.choices for r in routed)
    assert value(scrape(h), "seqr_decision_log_errors_total") == 3


def test_serve_takes_the_decision_log_flag_and_variable(monkeypatch):
    from seqr_cli.main import build_parser
    from seqr_server.cli import config_from_args
    a = build_parser().parse_args(["serve", "--decision-log", "-"])
    assert config_from_args(a).decision_log == "-"
    monkeypatch.setenv("SEQR_DECISION_LOG", "/var/log/seqr/decisions.jsonl")
    assert config_from_args(build_parser().parse_args(["serve"])).decision_log == "/var/log/seqr/decisions.jsonl"
    monkeypatch.delenv("SEQR_DECISION_LOG")
    assert config_from_args(build_parser().parse_args(["serve"])).decision_log is None
