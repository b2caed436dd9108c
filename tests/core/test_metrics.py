"""`GET /metrics` and the HTTP metrics (SPEC.md: Operations; issue 6)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from helpline.core import metrics
from helpline.core.config import Settings
from helpline.core.errors import NotFound
from helpline.main import create_app
from tests.conftest import REDIS_URL
from tests.servers import free_port

SPEC_METRICS = (
    "helpline_http_requests_total",
    "helpline_http_request_duration_seconds",
    "helpline_websocket_connections",
    "helpline_llm_tokens_total",
    "helpline_llm_time_to_first_token_seconds",
    "helpline_llm_request_duration_seconds",
    "helpline_llm_errors_total",
    "helpline_rate_limited_total",
    "helpline_jobs_total",
)
ITEM_TEMPLATE = "/metric-probes/{item_id}"
NESTED_TEMPLATE = "/metric-probes/{item_id}/parts/{part_id}"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_samples(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, /, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def declared_types(text: str) -> dict[str, str]:
    """`# TYPE name type` lines: every metric the exposition declares, observed or not."""
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
    return types


async def scrape(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return response.text


def add_probe_routes(app: FastAPI) -> None:
    """A templated route (200, or 404 for `missing`) and a nested one."""
    router = APIRouter(prefix="/metric-probes")
    parts = APIRouter(prefix="/parts")

    @router.get("/{item_id}")
    async def get_probe_item(item_id: str) -> dict[str, str]:
        """A templated route for the tests."""
        if item_id == "missing":
            raise NotFound("No such probe item")
        return {"id": item_id}

    @parts.get("/{part_id}")
    async def get_probe_part(item_id: str, part_id: str) -> dict[str, str]:
        """A route of a router included in another one."""
        return {"item": item_id, "part": part_id}

    router.include_router(parts, prefix="/{item_id}")
    app.include_router(router)


@pytest.fixture
def probe_app(app: FastAPI) -> FastAPI:
    add_probe_routes(app)
    return app


async def test_requests_are_counted_by_route_template(
    probe_app: FastAPI, client: httpx.AsyncClient
) -> None:
    del probe_app
    before = parse_samples(await scrape(client))
    item_id = uuid.uuid4().hex
    assert (await client.get(f"/metric-probes/{item_id}")).status_code == 200
    assert (await client.get("/metric-probes/missing")).status_code == 404
    text = await scrape(client)
    after = parse_samples(text)

    total = "helpline_http_requests_total"
    for status in ("200", "404"):
        labels = {"method": "GET", "route": ITEM_TEMPLATE, "status": status}
        assert value(after, total, **labels) - value(before, total, **labels) == 1
    count = "helpline_http_request_duration_seconds_count"
    labels = {"method": "GET", "route": ITEM_TEMPLATE}
    assert value(after, count, **labels) - value(before, count, **labels) == 2
    assert item_id not in text
    assert "missing" not in text


async def test_nested_router_routes_get_their_full_template(
    probe_app: FastAPI, client: httpx.AsyncClient
) -> None:
    del probe_app
    labels = {"method": "GET", "route": NESTED_TEMPLATE, "status": "200"}
    before = value(parse_samples(await scrape(client)), "helpline_http_requests_total", **labels)
    assert (await client.get("/metric-probes/a1/parts/b2")).status_code == 200
    after = value(parse_samples(await scrape(client)), "helpline_http_requests_total", **labels)
    assert after - before == 1


async def test_a_rate_limited_call_is_counted_under_its_route(settings: Settings) -> None:
    application = create_app(settings.model_copy(update={"rate_limit_default": "2/minute"}))
    add_probe_routes(application)
    labels = {"method": "GET", "route": NESTED_TEMPLATE, "status": "429"}
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            before = parse_samples(await scrape(http))
            statuses = [(await http.get("/metric-probes/a/parts/b")).status_code for _ in range(3)]
            after = parse_samples(await scrape(http))
    assert statuses == [200, 200, 429]
    total = "helpline_http_requests_total"
    assert value(after, total, **labels) - value(before, total, **labels) == 1
    limited = "helpline_rate_limited_total"
    assert value(after, limited, scope="api") - value(before, limited, scope="api") == 1


async def test_unmatched_paths_share_one_label(client: httpx.AsyncClient) -> None:
    labels = {"method": "GET", "route": metrics.UNMATCHED_ROUTE, "status": "404"}
    before = value(parse_samples(await scrape(client)), "helpline_http_requests_total", **labels)
    secret_path = f"/no-such-thing/{uuid.uuid4().hex}"
    assert (await client.get(secret_path)).status_code == 404
    assert (await client.get("/another/unknown/path")).status_code == 404
    text = await scrape(client)
    assert value(parse_samples(text), "helpline_http_requests_total", **labels) - before == 2
    assert secret_path not in text


async def test_unknown_methods_are_one_label(client: httpx.AsyncClient) -> None:
    labels = {"method": "OTHER", "route": "/health/live", "status": "405"}
    before = value(parse_samples(await scrape(client)), "helpline_http_requests_total", **labels)
    assert (await client.request("BREW", "/health/live")).status_code == 405
    after = value(parse_samples(await scrape(client)), "helpline_http_requests_total", **labels)
    assert after - before == 1


async def test_scrapes_are_not_counted(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        text = await scrape(client)
    assert 'route="/metrics"' not in text


async def test_metrics_lists_the_spec_metrics(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    types = declared_types(response.text)
    for name in SPEC_METRICS:
        assert name in types, name
    assert types["helpline_http_request_duration_seconds"] == "histogram"
    assert types["helpline_websocket_connections"] == "gauge"
    assert types["helpline_llm_tokens_total"] == "counter"


async def test_metric_objects_show_in_the_exposition(client: httpx.AsyncClient) -> None:
    model = f"probe-model-{uuid.uuid4().hex[:6]}"
    metrics.LLM_TOKENS.labels(model=model, kind="completion").inc(42)
    metrics.LLM_TIME_TO_FIRST_TOKEN.labels(model=model).observe(0.3)
    samples = parse_samples(await scrape(client))
    assert value(samples, "helpline_llm_tokens_total", model=model, kind="completion") == 42
    ttft_bucket = value(
        samples, "helpline_llm_time_to_first_token_seconds_bucket", model=model, le="0.5"
    )
    assert ttft_bucket == 1
    assert metrics.sample_value("helpline_llm_tokens_total", {"model": model}) == 42


async def test_metrics_is_left_out_of_the_openapi_document(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    assert "/metrics" not in document["paths"]


@pytest.fixture
async def token_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    application = create_app(settings.model_copy(update={"metrics_token": "scrape-me-please"}))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            yield http


async def test_metrics_token_is_required_when_set(token_client: httpx.AsyncClient) -> None:
    response = await token_client.get("/metrics")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "NOT_AUTHENTICATED"
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["x-request-id"] == response.json()["error"]["request_id"]


async def test_metrics_refuses_a_wrong_token(token_client: httpx.AsyncClient) -> None:
    for header in ("Bearer not-the-token", "Basic scrape-me-please", "scrape-me-please"):
        response = await token_client.get("/metrics", headers={"Authorization": header})
        assert response.status_code == 401, header
        assert response.json()["error"]["code"] == "NOT_AUTHENTICATED"


async def test_metrics_accepts_the_token(token_client: httpx.AsyncClient) -> None:
    response = await token_client.get(
        "/metrics", headers={"Authorization": "Bearer scrape-me-please"}
    )
    assert response.status_code == 200
    assert "helpline_http_requests_total" in declared_types(response.text)


async def test_metrics_is_open_without_a_token(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics", headers={"Authorization": "Bearer anything"})
    assert response.status_code == 200


def test_worker_metrics_server_serves_the_metrics() -> None:
    port = free_port()
    server, thread = metrics.start_worker_metrics_server(port, addr="127.0.0.1")
    try:
        metrics.JOBS.labels(name="probe_job", outcome="succeeded").inc()
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert response.status_code == 200
        samples = parse_samples(response.text)
        assert value(samples, "helpline_jobs_total", name="probe_job", outcome="succeeded") >= 1
        assert "helpline_job_duration_seconds" in declared_types(response.text)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_prepare_multiprocess_dir_empties_the_folder_and_exports_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    folder = settings.data_dir / "prometheus"
    folder.mkdir(parents=True)
    (folder / "counter_12345.db").write_bytes(b"stale")
    (folder / "gauge_livesum_12345.db").write_bytes(b"stale")

    prepared = metrics.prepare_multiprocess_dir(settings)

    assert prepared == folder.resolve()
    assert list(prepared.iterdir()) == []
    assert os.environ[metrics.MULTIPROC_ENV] == str(prepared)


def test_prepare_multiprocess_dir_keeps_a_configured_folder(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configured = tmp_path / "elsewhere"
    configured.mkdir()
    (configured / "histogram_999.db").write_bytes(b"stale")
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(configured))

    assert metrics.prepare_multiprocess_dir(settings) == configured.resolve()
    assert list(configured.iterdir()) == []
    assert not (settings.data_dir / "prometheus").exists()


# --- helpline serve --workers 2 -----------------------------------------------------------------


def _helpline_command() -> list[str]:
    script = Path(sys.executable).parent / "helpline"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "helpline.cli"]


STARTED = "Application startup complete"


def _wait_for_workers(
    url: str, workers: int, process: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    """Until every worker has started (each logs it once) and the server answers `url`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"helpline serve exited early:\n{log.read_text()}")
        if log.read_text(errors="replace").count(STARTED) >= workers:
            try:
                if httpx.get(url, timeout=5.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"helpline serve did not start in {timeout} s:\n{log.read_text()}")


@dataclass
class ServedProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    multiproc_dir: Path

    def stop(self) -> int:
        """SIGINT (like Ctrl-C), then wait; killed if it does not stop in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


@pytest.fixture(scope="module")
def multiworker_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedProcess]:
    """`helpline serve --workers 2` in a subprocess, on a temporary SQLite database.

    Shared by the tests below (starting it takes a while); the last one stops it.
    """
    tmp_path = tmp_path_factory.mktemp("multiworker")
    port = free_port()
    data_dir = tmp_path / "data"
    env = {
        key: value
        for key, value in os.environ.items()
        if key != metrics.MULTIPROC_ENV and not key.startswith(("OTEL_", "HELPLINE_"))
    }
    env.update(
        ENVIRONMENT="test",
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'helpline.db'}",
        REDIS_URL=REDIS_URL,
        REDIS_KEY_PREFIX=f"helpline-test:{uuid.uuid4().hex[:10]}:",
        DATA_DIR=str(data_dir),
        AUTH_JWT_SECRET="test-secret-" + "x" * 40,
        AUTO_MIGRATE="true",
        DEMO_KB="false",
        LLM_PROVIDER="fake",
        LOG_LEVEL="INFO",
        LOG_FORMAT="json",
        SHUTDOWN_GRACE_S="5",
    )
    log = tmp_path / "serve.log"
    command = [
        *_helpline_command(),
        *("serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"),
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    served = ServedProcess(process, f"http://127.0.0.1:{port}", data_dir / "prometheus")
    try:
        _wait_for_workers(f"{served.base_url}/health/live", 2, process, log, timeout=300)
        yield served
    finally:
        served.stop()


def _requests_per_worker(folder: Path, labels: dict[str, str]) -> dict[str, float]:
    """Each worker's own count of a request sample, read from its file in the shared folder."""
    counts: dict[str, float] = {}
    for path in folder.glob("counter_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        for key, sample_value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            _, sample_name, sample_labels, *_ = json.loads(key)
            if sample_name == "helpline_http_requests_total" and sample_labels == labels:
                counts[pid] = counts.get(pid, 0.0) + sample_value
    return counts


async def _scraped_total(base_url: str, labels: dict[str, str]) -> float:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    return value(parse_samples(response.text), "helpline_http_requests_total", **labels)


@pytest.mark.slow
async def test_metrics_add_up_across_workers(multiworker_server: ServedProcess) -> None:
    base_url, folder = multiworker_server.base_url, multiworker_server.multiproc_dir
    labels = {"method": "GET", "route": "/health/live", "status": "200"}
    before = await _scraped_total(base_url, labels)  # the fixture's start-up probe

    # New connections each time, so the requests spread over both workers; bursts go on until
    # both have answered some (the kernel decides which worker accepts a connection).
    async def hit() -> int:
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
            return (await http.get("/health/live")).status_code

    sent = 0
    for _ in range(10):
        statuses = await asyncio.gather(*(hit() for _ in range(30)))
        assert statuses == [200] * 30
        sent += 30
        per_worker = _requests_per_worker(folder, labels)
        if len([count for count in per_worker.values() if count]) >= 2:
            break
    assert len([count for count in per_worker.values() if count]) >= 2, per_worker
    assert sum(per_worker.values()) == before + sent

    # Every scrape, whichever worker answers it, reports the total of both workers.
    totals = {await _scraped_total(base_url, labels) for _ in range(6)}
    assert totals == {before + sent}


@pytest.mark.slow
def test_stopped_workers_leave_no_live_gauges(multiworker_server: ServedProcess) -> None:
    folder = multiworker_server.multiproc_dir
    assert len(list(folder.glob("gauge_livesum_*.db"))) == 2
    counters = sorted(path.name for path in folder.glob("counter_*.db"))
    assert len(counters) == 2

    assert multiworker_server.stop() == 0

    # Gone workers no longer count in `livesum` gauges; their counters still add up.
    assert list(folder.glob("gauge_livesum_*.db")) == []
    assert sorted(path.name for path in folder.glob("counter_*.db")) == counters
