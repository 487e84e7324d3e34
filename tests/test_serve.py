"""The Ray Serve app over real HTTP (issue 6): exact scores, the error contract, cold start, reload,
the metrics on Ray's Prometheus endpoint (issue 19) and several verticals in one app (issue 23).

One module-scoped run: a copy of the session's smoke run with its features and one kd_loopfm VM
(conftest's `smoke_trained`, trained once for every serving test module); one Serve app on a free
loopback port for the whole module. The metrics test runs first (it counts the app's requests from
its start); the reload test runs last (it swaps the served VM).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SERVED_ARM as ARM
from conftest import SERVED_SEED as SEED
from loopfm.runtime import free_port  # test_serve_faults and _refresh import it from here

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def served_run(tmp_path_factory, smoke_trained):
    """A copy of the smoke run with features and one trained VM (the one the app serves); each
    module using this fixture gets its own copy, free to write into."""
    from loopfm.rundir import RunDir

    src, features, vm = smoke_trained
    run = RunDir(tmp_path_factory.mktemp("serve") / "run")
    shutil.copytree(src.root, run.root)
    return run, features, vm


@pytest.fixture(scope="module")
def server(served_run, smoke_config):
    import httpx
    from ray import serve

    from loopfm.serve_apps.stage import deploy

    run, _, _ = served_run
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = deploy(smoke_config, run)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    yield client, args
    client.close()
    serve.shutdown()


def offline(run, vm_dir, n: int = 60):
    """The first n test examples of the VM's features and the offline VM's logits for them."""
    import pyarrow.dataset as pads

    from loopfm.features.collate import VMBatchCollate
    from loopfm.serve_apps.bundle import Bundle
    from loopfm.training.checkpoint import load_vm
    from loopfm.training.vm import predict

    bundle = Bundle.open(run.root, vm_dir)
    table = pads.dataset(str(run.features(bundle.vm.features_fingerprint) / "test"), format="parquet").to_table()
    table = table.sort_by([("user_id", "ascending"), ("ts", "ascending"), ("event_id", "ascending")]).slice(0, n)
    rows = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    model, manifest = load_vm(vm_dir)
    collate = VMBatchCollate(bundle.features, manifest.seq_width, with_seq=manifest.seq_width is not None,
                             with_raw=manifest.rawseq)
    return rows, predict(model, [collate.tensors(rows)])["logit"], manifest


def request_of(rows, i, context_columns=("user_segment",)) -> dict:
    context = {"ts": int(rows["ts"][i]), **{c: int(rows[c][i]) for c in context_columns if c in rows}}
    return {"user_id": int(rows["user_id"][i]), "items": [int(rows["item_id"][i])], "context": context}


def post_all(client, bodies, threads: int = 8) -> list:
    """POST every body from `threads` concurrent clients (so @serve.batch batches across requests)."""
    out = [None] * len(bodies)

    def work(k):
        for i in range(k, len(bodies), threads):
            out[i] = client.post("/v1/score", json=bodies[i])

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return out


def scrape(url: str) -> list[tuple[str, dict, float]]:
    """(name, labels, value) of every sample of a Prometheus text exposition."""
    import re

    import httpx

    samples = []
    for line in httpx.get(url, timeout=30).text.splitlines():
        m = re.match(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? ([^ ]+)', line)
        if m and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            samples.append((m.group(1), labels, float(m.group(3))))
    return samples


def total(samples, name: str, **labels) -> float:
    """The sum over every series of `name` whose labels include `labels` (one series per replica)."""
    return sum(v for n, ls, v in samples if n == name and all(ls.get(k) == x for k, x in labels.items()))


def test_serving_metrics_reach_rays_prometheus_endpoint(server, served_run):
    """Requests, errors by status, latency, cold starts and staleness as `ray.serve.metrics`, scraped
    from this node's metrics export port on loopback: the counters move by what was sent."""
    import ray

    client, args = server
    run, _, _ = served_run
    node = ray.get_runtime_context().get_node_id()
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["NodeID"] == node)
    url = f"http://127.0.0.1:{port}/metrics"
    rows, _, _ = offline(run, Path(args["vm_dir"]), n=4)
    known = [{"user_id": int(u), "items": [1, 2, 3]} for u in rows["user_id"]]  # no ts: all history, warm
    cold = [{"user_id": 10**15 + k, "items": [1, 2]} for k in range(3)]
    bad = [{"user_id": 5, "items": []}] * 2

    def counts(samples) -> dict:
        return {"ok": total(samples, "ray_loopfm_serve_requests_total", route="/v1/score", status="200"),
                "422": total(samples, "ray_loopfm_serve_requests_total", route="/v1/score", status="422"),
                "errors_422": total(samples, "ray_loopfm_serve_errors_total", route="/v1/score", status="422"),
                "errors_200": total(samples, "ray_loopfm_serve_errors_total", status="200"),
                "latency_count": total(samples, "ray_loopfm_serve_latency_ms_count", route="/v1/score"),
                "cold": total(samples, "ray_loopfm_serve_cold_starts_total")}

    before = counts(scrape(url))
    for body in known + cold:
        assert client.post("/v1/score", json=body).status_code == 200
    for body in bad:
        assert client.post("/v1/score", json=body).status_code == 422
    want = {"ok": len(known) + len(cold), "422": len(bad), "errors_422": len(bad), "errors_200": 0,
            "latency_count": len(known) + len(cold) + len(bad), "cold": len(cold)}
    deadline = time.monotonic() + 60  # the agent exports every few seconds
    while True:
        samples = scrape(url)
        now = counts(samples)
        moved = {k: now[k] - before[k] for k in want}
        staleness = [v for n, ls, v in samples if n == "ray_loopfm_serve_store_staleness_s"]
        if (moved == want and staleness) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert moved == want, (moved, want)
    assert staleness and min(staleness) > 3600  # the synthetic log's events are decades old
    buckets = [ls for n, ls, _ in samples
               if n == "ray_loopfm_serve_latency_ms_bucket" and ls.get("route") == "/v1/score"]
    assert buckets and all(ls.get("deployment") == "ScoringIngress" for ls in buckets)


def test_scores_equal_offline_vm_over_http(server, served_run):
    client, args = server
    run, _, vm = served_run
    rows, logits, manifest = offline(run, Path(args["vm_dir"]))
    responses = post_all(client, [request_of(rows, i) for i in range(len(logits))])
    assert [r.status_code for r in responses] == [200] * len(logits), responses[0].text
    bodies = [r.json() for r in responses]
    served = np.array([b["logits"][0] for b in bodies])
    scores = np.array([b["scores"][0] for b in bodies])
    assert np.abs(served - logits).max() < 1e-5
    assert np.abs(scores - 1 / (1 + np.exp(-logits.astype(np.float64)))).max() < 1e-5
    assert manifest.model_version == vm.model_version
    assert {b["model_version"] for b in bodies} == {vm.model_version}
    assert {b["store_version"] for b in bodies} == {vm.store_version}
    # one request with several candidates scores each as its own request would
    i = 0
    same = [j for j in range(len(logits))
            if rows["user_id"][j] == rows["user_id"][i] and rows["ts"][j] >= rows["ts"][i]]
    body = request_of(rows, i)
    body["items"] = [int(rows["item_id"][i]), 123456789, *[int(rows["item_id"][j]) for j in same[1:3]]]
    multi = client.post("/v1/score", json=body).json()
    single = [client.post("/v1/score", json={**body, "items": [it]}).json()["logits"][0] for it in body["items"]]
    assert np.abs(np.array(multi["logits"]) - np.array(single)).max() < 1e-5
    assert abs(multi["logits"][0] - logits[i]) < 1e-5
    assert multi["oov_items"] == 1


BAD = [  # (raw body, content type, status, field named)
    ('{"user_id": 5, "items": [1,', "application/json", 400, "body"),
    ("not json at all", "application/json", 400, "body"),
    ("", "application/json", 422, "body"),
    ("[1, 2]", "application/json", 422, "body"),
    ('{"items": [1]}', "application/json", 422, "user_id"),
    ('{"user_id": 5}', "application/json", 422, "items"),
    ('{"user_id": "5", "items": [1]}', "application/json", 422, "user_id"),
    ('{"user_id": 5.5, "items": [1]}', "application/json", 422, "user_id"),
    ('{"user_id": true, "items": [1]}', "application/json", 422, "user_id"),
    ('{"user_id": 5, "items": []}', "application/json", 422, "items"),
    ('{"user_id": 5, "items": [1, "x"]}', "application/json", 422, "items.1"),
    ('{"user_id": 5, "items": 3}', "application/json", 422, "items"),
    ('{"user_id": 99999999999999999999999, "items": [1]}', "application/json", 422, "user_id"),
    ('{"user_id": 5, "items": [1], "context": {"ts": "noon"}}', "application/json", 422, "context.ts"),
    ('{"user_id": 5, "items": [1], "context": {"ts": 9000000000000000000}}', "application/json", 422, "context.ts"),
    ('{"user_id": 5, "items": [1], "context": {"weather": 1}}', "application/json", 422, "context.weather"),
    ('{"user_id": 5, "items": [1], "context": [1]}', "application/json", 422, "context"),
    ('{"user_id": 5, "items": [1], "itemz": [2]}', "application/json", 422, "itemz"),
    ('{"user_id": 5, "items": [1]}', "text/plain", 422, "body"),
    (b'{"user_id": 5, "items": [1], "context": {"\xff\xfe": 1}}', "application/json", 400, "body"),  # not UTF-8
    ("[" * 20_000 + "]" * 20_000, "application/json", 400, "body"),  # nests deeper than the parser recurses
    ('{"user_id": 5, "items": [1], "context": {"ts": 4611686018427387905}}', "application/json", 422, "context.ts"),
]


def test_bad_requests_get_4xx_naming_the_field_and_service_survives(server, smoke_config):
    from ray import serve

    client, _ = server
    for body, kind, status, field in BAD:
        r = client.post("/v1/score", content=body, headers={"content-type": kind})
        assert r.status_code == status, (body[:80], r.status_code, r.text)
        error = r.json()
        assert field in [e["field"] for e in error["errors"]], (body[:80], error)
        assert error["detail"].startswith(field) or f"; {field}:" in error["detail"], error
        assert error["request_id"] and error["request_id"] == r.headers["x-request-id"], (body[:80], error)
    limit = smoke_config.serve.max_items
    r = client.post("/v1/score", json={"user_id": 5, "items": list(range(limit + 1))})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "items", r.text
    assert f"at most {limit}" in r.json()["detail"]
    # still serving, nothing restarted
    assert client.post("/v1/score", json={"user_id": 5, "items": list(range(limit))}).status_code == 200
    assert client.get("/healthz").json()["status"] == "ok"
    status = serve.status().applications["loopfm"]
    assert status.status == "RUNNING"
    assert all(d.status == "HEALTHY" for d in status.deployments.values())


def test_the_edge_bounds_bodies_and_answers_every_error_in_one_shape(server, smoke_config):
    """A body over the cap is a 413 however it arrives (declared or streamed); the published schema
    says exactly what is accepted; the framework's own 404/405 use the service's error shape; the
    request id a client sends comes back in the header and the body."""
    from loopfm.serve_apps.ingress import default_body_limit

    client, _ = server
    limit = default_body_limit(smoke_config.serve.max_items)
    huge = b'{"user_id": 5, "items": [' + b"1," * limit + b'1]}'
    streamed = (huge[i:i + 4096] for i in range(0, len(huge), 4096))  # chunked: no Content-Length
    for content in (huge, streamed):
        r = client.post("/v1/score", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["errors"][0]["field"] == "body", r.text[:300]
        assert f"limit of {limit} bytes" in r.json()["detail"]
    for method, path, status in (("GET", "/nowhere", 404), ("GET", "/v1/score", 405)):
        r = client.request(method, path)
        assert r.status_code == status and r.json()["errors"][0]["field"] == "path", r.text
        assert r.json()["request_id"] == r.headers["x-request-id"]
    r = client.post("/v1/score", json={"user_id": 5, "items": []}, headers={"x-request-id": "client-chosen-7"})
    assert r.headers["x-request-id"] == r.json()["request_id"] == "client-chosen-7"

    spec = client.get("/openapi.json").json()
    request = spec["components"]["schemas"]["ScoreRequest"]["properties"]
    assert request["items"]["maxItems"] == smoke_config.serve.max_items
    assert (request["user_id"]["minimum"], request["user_id"]["maximum"]) == (-2**63, 2**63 - 1)  # exact, not 2.0**63
    assert request["context"]["additionalProperties"] is False
    assert request["context"]["properties"]["ts"]["maximum"] == 2**62
    assert set(request["context"]["properties"]) == {"ts", "user_segment"}
    # the schema's extremes are accepted
    edge = {"user_id": 2**63 - 1, "items": [-2**63] * smoke_config.serve.max_items,
            "context": {"ts": 2**62, "user_segment": -2**63}}
    assert client.post("/v1/score", json=edge).status_code == 200
    assert client.post("/v1/score", json={"user_id": 5.0, "items": [1.0]}).status_code == 200  # JSON Schema integers
    r = client.post("/v1/score", json={"user_id": 1e17, "items": [1]})  # a double that may not be the id meant
    assert r.status_code == 422 and "2**53" in r.json()["detail"], r.text
    for code in (400, 404, 405, 413, 422, 500, 503):
        assert str(code) in spec["paths"]["/v1/score"]["post"]["responses"]


def test_a_server_bug_is_a_500_with_the_request_id_not_a_503():
    """The catch-all names the fault a 500 (retrying a bug fails again) and carries the request id."""
    import asyncio
    import json

    from starlette.requests import Request

    from loopfm.serve_apps.ingress import _unexpected

    scope = {"type": "http", "method": "POST", "path": "/v1/score", "headers": [(b"x-request-id", b"abc123")],
             "query_string": b"", "server": ("127.0.0.1", 80), "scheme": "http", "root_path": ""}
    response = asyncio.run(_unexpected(Request(scope), KeyError("user_segment_idx")))
    body = json.loads(response.body)
    assert response.status_code == 500 and body["request_id"] == "abc123" and "KeyError" in body["detail"]


def test_app_args_name_one_vm_or_one_per_vertical():
    from pydantic import ValidationError

    from loopfm.serve_apps.app import AppArgs

    for vms in ({}, {"vm_dir": "a", "vm_dirs": {1: "b"}}, {"vm_dirs": {}}):
        with pytest.raises(ValidationError, match="vm_dir / vm_dirs: give exactly one"):
            AppArgs.model_validate({"run_dir": "r", **vms})
    assert AppArgs.model_validate({"run_dir": "r", "vm_dirs": {"3": "b"}}).served() == {3: "b"}  # YAML keys
    with pytest.raises(ValidationError, match="topology"):
        AppArgs.model_validate({"run_dir": "r", "vm_dir": "a", "topology": "three-hops"})


def _generated_bodies():
    """Hypothesis: raw bodies. Any JSON value (strings with lone surrogates too), objects shaped like
    a request whose fields hold any JSON, nesting deeper than a parser recurses, and item lists
    from empty to far past the body cap."""
    import json

    from hypothesis import strategies as st

    text = st.text(st.characters(exclude_categories=()), max_size=8)  # surrogates included
    scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                       st.floats(allow_nan=False), text)
    anything = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(text, inner, max_size=3)),
                            max_leaves=8)
    shaped = st.fixed_dictionaries({}, optional={"user_id": anything, "items": anything, "context": anything,
                                                 "extra": anything})
    nested = st.integers(min_value=1, max_value=30_000).map(lambda d: "[" * d + "]" * d)
    long = st.integers(min_value=0, max_value=40_000).map(lambda n: json.dumps({"user_id": 1, "items": [7] * n}))
    return st.one_of(st.one_of(anything, shaped).map(json.dumps), nested, long)


def test_generated_bodies_never_get_a_5xx(server):
    """Property (issue 7.5): whatever is posted, the answer is a 200 or a 4xx in the error shape,
    never a 5xx."""
    from hypothesis import HealthCheck, given, settings

    client, _ = server
    seen = []

    @settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(_generated_bodies())
    def post(body):
        r = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
        seen.append(r.status_code)
        assert r.status_code < 500, (body[:200], r.status_code, r.text[:300])
        if r.status_code != 200:
            assert r.json()["errors"] and r.json()["request_id"] == r.headers["x-request-id"], r.text[:300]

    post()
    assert len(seen) >= 80 and any(s == 422 for s in seen)
    assert client.get("/healthz").status_code == 200


def test_schemathesis_fuzz_of_the_live_openapi_schema(server):
    """Schemathesis generates requests from the served /openapi.json, valid ones and invalid ones,
    and checks each answer: never a 5xx, every status and body as the schema declares, every
    schema-valid request accepted (the schema says exactly what the server takes) and every
    schema-invalid one refused with a 4xx. Bounded: 50 valid + 50 invalid scoring requests."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import checks
    from schemathesis.generation import GenerationMode

    client, _ = server
    base = str(client.base_url)
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    verdicts = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
                checks.response_schema_conformance, checks.negative_data_rejection, checks.positive_data_acceptance]
    statuses = []
    for path, method, examples in (("/v1/score", "POST", 50), ("/healthz", "GET", 2), ("/v1/models", "GET", 2)):
        operation = schema[path][method]
        modes = list(GenerationMode) if method == "POST" else [GenerationMode.POSITIVE]  # a GET has no input to break
        for mode in modes:
            @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case):
                response = case.call(base_url=base, timeout=60)
                statuses.append((path, mode.value, response.status_code))  # noqa: B023  (call runs at once, in this iteration)
                case.validate_response(response, checks=verdicts)

            call()
    scored = [s for p, m, s in statuses if p == "/v1/score"]
    assert len(scored) >= 60 and 200 in scored and 422 in scored, statuses


def test_cold_start_unknown_items_and_metadata_routes(server, served_run):
    client, _ = server
    run, _, vm = served_run
    r = client.post("/v1/score", json={"user_id": 10**15, "items": [1, 2, 10**12]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cold_start"] is True and body["oov_items"] >= 1 and len(body["scores"]) == 3
    assert all(0 < s < 1 for s in body["scores"])
    # a known user before any of their events is a cold start too (nothing strictly earlier)
    user = int(offline(run, run.vm(ARM, SEED, vm.fingerprint), n=1)[0]["user_id"][0])
    early = client.post("/v1/score", json={"user_id": user, "items": [1], "context": {"ts": -1}}).json()
    late = client.post("/v1/score", json={"user_id": user, "items": [1]}).json()
    assert early["cold_start"] is True and late["cold_start"] is False
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["detail"] is None  # no staleness SLA configured
    assert (health["model_version"], health["store_version"]) == (vm.model_version, vm.store_version)
    models = client.get("/v1/models").json()["models"]
    assert models[0]["model_version"] == vm.model_version and models[0]["arm"] == ARM
    assert models[0]["store_rows"] > 0 and models[0]["store_deltas"] == 0 and models[0]["refresh_error"] is None
    assert abs(models[0]["staleness_s"] - (time.time() - models[0]["newest_event_ts"])) < 600
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/score", "/healthz", "/v1/models"} <= set(spec["paths"])


def test_store_of_another_version_is_refused(served_run, tmp_path):
    from loopfm.errors import VersionMismatchError
    from loopfm.serve_apps.bundle import Bundle
    from loopfm.serve_apps.lookup import FeatureTable
    from loopfm.store.schema import StoreManifest

    run, _, vm = served_run
    other = tmp_path / "store"
    shutil.copytree(run.store(vm.store_version), other)
    manifest = StoreManifest.read(other)
    manifest.store_version = "0123456789ab"
    (other / "manifest.json").write_text(__import__("json").dumps(manifest.to_dict()))
    vm_dir = run.vm(ARM, SEED, vm.fingerprint)
    with pytest.raises(VersionMismatchError, match=f"0123456789ab.*{vm.store_version}"):
        FeatureTable(Bundle.open(run.root, vm_dir, other))


def test_serve_build_writes_a_config_serve_deploy_accepts(served_run, smoke_config, tmp_path):
    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from loopfm.cli import main
    from loopfm.serve_apps.app import AppArgs, build_app

    run, _, _ = served_run
    out = tmp_path / "serve.yaml"
    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    assert main(["serve", "build", "--config", str(smoke), "--out", str(run.root), "-o", str(out),
                 "--set", "serve.port=8123"]) == 0
    config = yaml.safe_load(out.read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "loopfm.serve_apps.app:build_app" and schema.http_options.port == 8123
    assert schema.http_options.host == "127.0.0.1" and schema.proxy_location == "HeadOnly"
    args = AppArgs.model_validate(app.args)
    assert Path(args.vm_dir).parent.name == ARM
    assert isinstance(build_app(app.args), Application)

    cluster = tmp_path / "cluster_serve.yaml"  # a cluster's: a proxy on every node, reachable from its network
    assert main(["serve", "build", "--config", str(smoke), "--out", str(run.root), "-o", str(cluster),
                 "--set", "serve.proxy_location=EveryNode", "--set", "serve.host=0.0.0.0"]) == 0
    schema = ServeDeploySchema.model_validate(yaml.safe_load(cluster.read_text()))
    assert schema.proxy_location == "EveryNode" and schema.http_options.host == "0.0.0.0"


def lookup_matches_offline(run, vm_dir: Path) -> tuple:
    """Every test example through the lookup's point-in-time features and the VM deployment's
    scoring path, next to the offline VM: (rows, offline logits, requests, scorer, table)."""
    from loopfm.serve_apps.bundle import Bundle
    from loopfm.serve_apps.lookup import FeatureTable
    from loopfm.serve_apps.model import VMScorer

    bundle = Bundle.open(run.root, vm_dir)
    table, scorer = FeatureTable(bundle), VMScorer(bundle)
    rows, logits, _ = offline(run, vm_dir, n=10**9)
    requests = [table.features(int(rows["user_id"][i]), [int(rows["item_id"][i])],
                               {"ts": int(rows["ts"][i]), "user_segment": int(rows["user_segment"][i])})
                for i in range(len(logits))]
    out = scorer.score(requests)
    assert np.abs(np.concatenate([o["logits"] for o in out]) - logits).max() < 1e-5
    # the same features as the features stage wrote: sequence bytes and counts, the label-aware
    # history, the rawseq slots and the user and item counters
    for i in range(len(logits)):
        user = requests[i]["user"]
        if table.with_seq:  # a VM that reads no stored sequence is served without loading the store
            assert user["seq_z"] == rows["seq_z"][i] and user["seq_len_valid"] == rows["seq_len_valid"][i]
        for c in ("hist_items", "hist_cats", "hist_labels", "raw_items", "raw_cats", "raw_surfaces", "raw_labels"):
            assert np.array_equal(user[c], np.asarray(rows[c][i])), (c, i)
        np.testing.assert_allclose(requests[i]["dense"][0], np.asarray(rows["dense"][i]), rtol=1e-5, atol=1e-6)
    return rows, logits, requests, scorer, table


def test_lookup_and_vm_in_process_match_every_test_example(served_run):
    """No HTTP: the lookup + the VM deployment's scoring path equal the offline VM on every test
    example (the join rule, not just a sample)."""
    from loopfm.serve_apps.model import STALE

    run, _, vm = served_run
    rows, logits, requests, scorer, table = lookup_matches_offline(run, run.vm(ARM, SEED, vm.fingerprint))
    # omitted context takes the user's latest logged value; a request from another store version is stale
    assert (table.features(int(rows["user_id"][0]), [1], {"ts": 1})["user"]["user_segment_idx"]
            == rows["user_segment_idx"][0])
    stale = scorer.score([{**requests[0], "store_version": "other"}, requests[1]])
    assert (stale[0] == {STALE: True, "model_version": vm.model_version}
            and abs(stale[1]["logits"][0] - logits[1]) < 1e-5)


def test_the_rawseq_control_serves_its_training_scores(served_run, smoke_config):
    """The control arm reads the raw-token slots: served from the same lookup, equal to the offline VM."""
    from loopfm.training.vm import arm_config, train_vm

    run, features, _ = served_run
    control = train_vm(arm_config(smoke_config.updated({"train.epochs": 1}), "rawseq", 0), run, features)
    assert control.rawseq and control.seq_width is None
    lookup_matches_offline(run, run.vm("rawseq", 0, control.fingerprint))


def perturbed_vm(run, vm_dir: Path, name: str, store_version=None, features=None) -> Path:
    """A new checkpoint of the same arm and seed (every bias moved): what a retrain writes. With
    `store_version`/`features` it claims to be trained on that store version and feature set."""
    import torch

    from loopfm.training.checkpoint import VMManifest, save_vm
    from loopfm.weights import state_bytes, verified_state

    manifest = VMManifest.read(vm_dir)
    state = verified_state(vm_dir, manifest.model_version)
    for key in [k for k in state if k.endswith("bias")]:
        state[key] = state[key] + 0.1
    if store_version:
        manifest.store_version, manifest.features_fingerprint = store_version, features
    new = vm_dir.parent / f"seed{SEED}-{name}"
    new.mkdir()
    save_vm(new, state_bytes({k: torch.as_tensor(v) for k, v in state.items()}), manifest)
    return new


def new_store_version(run, vm, version: str, features: str) -> None:
    """A store version `version` (the same rows under a new version) and a feature set naming it."""
    import json

    from loopfm.features.reader import FeaturesManifest

    shutil.copytree(run.store(vm.store_version), run.store(version))
    manifest = json.loads((run.store(version) / "manifest.json").read_text())
    (run.store(version) / "manifest.json").write_text(json.dumps({**manifest, "store_version": version}))
    shutil.copytree(run.features(vm.features_fingerprint), run.features(features))
    fm = FeaturesManifest.read(run.features(features))
    fm.fingerprint, fm.store_version = features, version
    (run.features(features) / "manifest.json").write_text(json.dumps(fm.to_dict()))


def score_during(client, bodies, action, done) -> list:
    """(status, model_version, store_version) of every request 4 clients fire while `action` runs,
    until `done(results)` holds (at most 60 s after it)."""
    import httpx

    results, stop = [], threading.Event()

    def fire(k):
        with httpx.Client(base_url=str(client.base_url), timeout=60) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/score", json=bodies[k % len(bodies)])
                    if r.status_code != 200:
                        results.append((r.status_code, r.text[:300], None))
                        continue
                    body = r.json()
                    results.append((r.status_code, body.get("model_version"), body.get("store_version")))
                except Exception as exc:  # a dropped connection counts as a failure
                    results.append((-1, repr(exc), None))

    threads = [threading.Thread(target=fire, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        action()
        deadline = time.time() + 60
        while time.time() < deadline and not done(results[-8:]):
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return results


def test_one_app_serves_the_vms_of_two_verticals_from_one_store(server, served_run):
    """Two VMs on one store version under two vertical keys (each manifest declares its vertical):
    each request's `vertical` picks its VM, over HTTP;
    an unknown or missing vertical is a 422 naming the field and the verticals served; VMs on two
    store versions, or one registered under another vertical than it declares, are refused."""
    import json

    from ray import serve

    from loopfm.datasets.splits import SplitInfo
    from loopfm.errors import MissingInputError, VersionMismatchError
    from loopfm.serve_apps.app import AppArgs, build_app
    from loopfm.serve_apps.bundle import latest_vm, open_bundles

    client, args = server
    run, _, vm = served_run
    first = Path(args["vm_dir"])
    home = SplitInfo.load(run).vertical
    other = home + 7
    made = [perturbed_vm(run, first, "vertical0007")]
    try:
        second = made[0]
        manifest = json.loads((second / "manifest.json").read_text())
        (second / "manifest.json").write_text(json.dumps({**manifest, "vertical": other}))
        assert latest_vm(run, ARM, SEED, vertical=other) == second
        assert latest_vm(run, ARM, SEED, vertical=home) == first
        with pytest.raises(MissingInputError, match="vertical 99"):
            latest_vm(run, ARM, SEED, vertical=99)
        with pytest.raises(VersionMismatchError, match=f"serves vertical {other}, but is registered under vertical 3"):
            open_bundles(run.root, {3: second})
        new_store_version(run, vm, "5707e0000009", "feature00009")
        made.append(perturbed_vm(run, first, "otherstore09", "5707e0000009", "feature00009"))
        manifest = json.loads((made[1] / "manifest.json").read_text())
        (made[1] / "manifest.json").write_text(json.dumps({**manifest, "vertical": other}))
        with pytest.raises(VersionMismatchError, match=f"{vm.store_version}.*5707e0000009"):
            build_app({**args, "vm_dir": None, "vm_dirs": {home: str(first), other: str(made[1])}})

        app = AppArgs.model_validate({**args, "vm_dir": None, "vm_dirs": {home: str(first), other: str(second)}})
        serve.run(build_app(app.model_dump()), name="verticals", route_prefix="/verticals")
        rows, first_logits, _ = offline(run, first, n=6)
        _, second_logits, _ = offline(run, second, n=6)
        for vertical, logits in ((home, first_logits), (other, second_logits)):
            bodies = [{**request_of(rows, i), "vertical": vertical} for i in range(len(logits))]
            answers = [client.post("/verticals/v1/score", json=b) for b in bodies]
            assert [a.status_code for a in answers] == [200] * len(bodies), answers[0].text
            assert {a.json()["vertical"] for a in answers} == {vertical}
            assert np.abs(np.array([a.json()["logits"][0] for a in answers]) - logits).max() < 1e-5
        assert np.abs(first_logits - second_logits).min() > 1e-3  # two VMs, not one answering twice
        for body, problem in (({"user_id": 5, "items": [1]}, "required"),
                              ({"user_id": 5, "items": [1], "vertical": 99}, "unknown vertical 99")):
            r = client.post("/verticals/v1/score", json=body)
            assert r.status_code == 422 and r.json()["errors"][0]["field"] == "vertical", r.text
            assert problem in r.json()["detail"] and f"{home}, {other}" in r.json()["detail"], r.text
        models = client.get("/verticals/v1/models").json()["models"]
        assert [(m["vertical"], m["vm_dir"]) for m in models] == [(home, str(first)), (other, str(second))]
        assert {m["store_version"] for m in models} == {vm.store_version}
        health = client.get("/verticals/healthz").json()
        assert health["model_version"] is None and set(health["model_versions"]) == {str(home), str(other)}
        spec = client.get("/verticals/openapi.json").json()["components"]["schemas"]["ScoreRequest"]
        assert spec["properties"]["vertical"]["enum"] == [home, other] and "vertical" in spec["required"]
    finally:
        if "verticals" in serve.status().applications:
            serve.delete("verticals")
        for d in made:
            shutil.rmtree(d)


def test_reload_picks_up_a_new_checkpoint_and_store_without_failed_requests(server, served_run, smoke_config):
    from loopfm.serve_apps.stage import reload

    client, args = server
    run, _, vm = served_run
    swaps = []

    # 1. a new checkpoint of the served arm and seed, same store
    new_dir = perturbed_vm(run, Path(args["vm_dir"]), "reloaded0001")
    rows, new_logits, new_vm = offline(run, new_dir, n=5)
    bodies = [request_of(rows, i) for i in range(5)]
    results = score_during(client, bodies, lambda: swaps.append(reload(smoke_config, run)),
                           lambda last: any(v == new_vm.model_version for _, v, _ in last))
    (before, after), = swaps
    assert before["model_version"] == vm.model_version and after["model_version"] == new_vm.model_version
    assert len(results) > 20, "the clients barely ran during the reload"
    assert not [r for r in results if r[0] != 200], [r for r in results if r[0] != 200][:5]
    versions = [v for _, v, _ in results]
    assert vm.model_version in versions and new_vm.model_version in versions
    assert versions[-1] == new_vm.model_version
    served = np.array([client.post("/v1/score", json=b).json()["logits"][0] for b in bodies])
    assert np.abs(served - new_logits).max() < 1e-5

    # 2. a new store version with a VM trained on it: the lookup and the VM switch together
    new_store_version(run, vm, "5707e0000002", "feature00002")
    store_dir = perturbed_vm(run, new_dir, "newstore0002", "5707e0000002", "feature00002")
    _, store_logits, store_vm = offline(run, store_dir, n=5)
    results = score_during(client, bodies, lambda: swaps.append(reload(smoke_config, run)),
                           lambda last: any(s == "5707e0000002" for _, _, s in last))
    assert swaps[-1][1]["store_version"] == "5707e0000002"
    assert not [r for r in results if r[0] != 200], [r for r in results if r[0] != 200][:5]
    pairs = {(v, s) for _, v, s in results}
    assert pairs <= {(new_vm.model_version, vm.store_version), (store_vm.model_version, "5707e0000002")}, pairs
    assert (store_vm.model_version, "5707e0000002") in pairs
    served = np.array([client.post("/v1/score", json=b).json()["logits"][0] for b in bodies])
    assert np.abs(served - store_logits).max() < 1e-5
