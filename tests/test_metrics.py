"""The Prometheus backend (train/prometheus.py) and configs/monitoring/: exposition, NVML, rules, dashboards.

Needs Debian's `prometheus` package (prometheus + promtool; `make prometheus-tool` installs it). Without it these
tests fail, unless TUBELET_ALLOW_SKIP_PROMETHEUS=1, which skips the ones that need the binaries.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pipeline.clips import LoaderStats
from train import prometheus as prom
from train.config import MetricsConfig
from train.metrics import NullMetrics, build_metrics
from train.step import StepStats

ROOT = Path(__file__).resolve().parents[1]
MON = ROOT / "configs" / "monitoring"
DASHBOARD = MON / "grafana" / "dashboards" / "tubelet.json"

LOADER_NAMES = ["tubelet_loader_wait_seconds", "tubelet_loader_feed_seconds", "tubelet_loader_latency_seconds",
                "tubelet_loader_samples", "tubelet_loader_padded_samples", "tubelet_loader_read_bytes",
                "tubelet_loader_queue_depth", "tubelet_loader_epoch", "tubelet_loader_position",
                "tubelet_loader_corrupt_samples"]
TRAIN_NAMES = ["tubelet_train_step_seconds", "tubelet_train_data_wait_seconds", "tubelet_train_steps",
               "tubelet_train_skipped_steps", "tubelet_train_clips", "tubelet_train_step", "tubelet_train_loss",
               "tubelet_train_learning_rate", "tubelet_train_weight_decay", "tubelet_train_ema_momentum",
               "tubelet_train_grad_norm", "tubelet_train_nonfinite", "tubelet_train_nonfinite_stop",
               "tubelet_train_checkpoint_step", "tubelet_train_checkpoint_seconds",
               "tubelet_train_checkpoint_timestamp_seconds", "tubelet_train_running",
               "tubelet_train_progress_timestamp_seconds", "tubelet_train_dist_timeout_seconds"]
PROCESS_NAMES = ["process_cpu_seconds", "process_resident_memory_bytes", "python_info"]
GPU_NAMES = ["tubelet_gpu_utilization_ratio", "tubelet_gpu_decoder_utilization_ratio",
             "tubelet_gpu_memory_used_bytes", "tubelet_gpu_memory_total_bytes", "tubelet_gpu_power_watts",
             "tubelet_gpu_energy_joules"]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("TUBELET_ALLOW_SKIP_PROMETHEUS"):
            pytest.skip(f"{name} not installed (TUBELET_ALLOW_SKIP_PROMETHEUS is set)")
        pytest.fail(f"{name} not found: install Debian's prometheus package (`make prometheus-tool`, or apt-get "
                    "install prometheus), or set TUBELET_ALLOW_SKIP_PROMETHEUS=1 to skip these tests")
    return path


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], input=stdin, capture_output=True, text=True, cwd=MON,
                          timeout=60)


# -- the exporter ----------------------------------------------------------------------------------


def cfg(**kw) -> MetricsConfig:
    return MetricsConfig(**{"base_port": 0, "final_scrape_s": 0.0, **kw})


def feed(m, steps: int = 3, skip_at: int = 0) -> None:
    """Realistic numbers: 8-clip batches, ~40 ms waits, ~0.6 s steps, a checkpoint, a skipped step."""
    m.started(0, 0, 600.0)
    for s in range(1, steps + 1):
        m.loader(LoaderStats(wait_seconds=0.04 * s, feed_seconds=0.12, latency_seconds=0.35, bytes_read=2_400_000,
                             samples=8, padded=1 if s == steps else 0, queue_depth=2, epoch=0, position=16 * s))
        bad = s == skip_at
        if bad:
            m.nonfinite(s, "skip")
        m.step(StepStats(step=s, step_seconds=0.6, data_wait_seconds=0.04 * s, clips=8,
                         loss=float("nan") if bad else 0.9 - 0.01 * s, lr=2e-4 + 1e-6 * s, weight_decay=0.04,
                         ema_momentum=0.998, grad_norm=float("inf") if bad else 1.5, skipped=bad))
    m.checkpoint(steps, 0.8)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


@contextlib.contextmanager
def exporter(**kw):
    m = prom.PrometheusMetrics(cfg(**kw), rank=1, local_rank=0, run="run-a")
    try:
        yield m
    finally:
        m.close()


def nvml_loadable() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def test_exposition_passes_promtool_and_labels_every_series_with_run_and_rank():
    with exporter() as m:
        feed(m, steps=4, skip_at=3)
        assert m.url.startswith("http://127.0.0.1:") and m.url.endswith("/metrics")
        text = scrape(m.url)
    r = promtool("check", "metrics", stdin=text)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr
    fams = families(text)
    for name in LOADER_NAMES + TRAIN_NAMES + PROCESS_NAMES:
        assert name in fams, f"{name} missing from the exposition"
    for f in fams.values():
        for s in f.samples:
            assert s.labels.get("rank") == "1" and s.labels.get("run") == "run-a", s
            assert not s.name.endswith("_created"), s
    value = {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "run"))): s.value
             for f in fams.values() for s in f.samples}
    r1 = (("rank", "1"),)
    assert value[("tubelet_train_steps_total", r1)] == 4
    assert value[("tubelet_train_skipped_steps_total", r1)] == 1
    assert value[("tubelet_train_clips_total", r1)] == 32
    assert value[("tubelet_train_step_seconds_count", r1)] == 4
    assert value[("tubelet_train_data_wait_seconds_sum", r1)] == pytest.approx(0.4)
    assert value[("tubelet_train_loss", r1)] == pytest.approx(0.86)  # the skipped NaN step left it alone
    assert value[("tubelet_train_grad_norm", r1)] == 1.5
    assert value[("tubelet_train_nonfinite_total", (("action", "skip"), ("rank", "1")))] == 1
    assert value[("tubelet_train_nonfinite_total", (("action", "stop"), ("rank", "1")))] == 0
    assert value[("tubelet_train_nonfinite_stop", r1)] == 0
    assert value[("tubelet_loader_read_bytes_total", r1)] == 4 * 2_400_000
    assert value[("tubelet_loader_padded_samples_total", r1)] == 1
    assert value[("tubelet_loader_position", r1)] == 64
    assert value[("tubelet_train_checkpoint_step", r1)] == 4
    if not nvml_loadable():  # this CPU machine: NVML absent, the exporter runs and serves no GPU series
        assert not [n for n in fams if n.startswith("tubelet_gpu_")]


def test_last_values_are_absent_until_reported():
    """No loss or checkpoint step of 0 before the first step or checkpoint; counters and the stop flag at 0."""
    with exporter(nvml=False) as m:
        fams = families(scrape(m.url))
        assert not {"tubelet_train_loss", "tubelet_train_step", "tubelet_train_checkpoint_step",
                    "tubelet_loader_position"} & set(fams)
        assert fams["tubelet_train_steps"].samples[0].value == 0
        assert fams["tubelet_train_nonfinite_stop"].samples[0].value == 0
        feed(m, steps=1)
        fams = families(scrape(m.url))
        assert fams["tubelet_train_loss"].samples[0].value == pytest.approx(0.89)


def test_without_nvml_the_gpu_series_are_absent(monkeypatch):
    import pynvml

    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    with exporter() as m:
        feed(m)
        fams = families(scrape(m.url))
    assert "tubelet_train_steps" in fams and not [n for n in fams if n.startswith("tubelet_gpu_")]
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed at all
    with exporter() as m:
        assert not [n for n in families(scrape(m.url)) if n.startswith("tubelet_gpu_")]


class FakeNvml(types.ModuleType):
    """pynvml with 8 GPUs; GPU 5 has no energy counter (NotSupported) and no GPM (per-engine decoder figures);
    the others have 7 NVDEC engines, engine 2 busier than the rest (90% against 10%)."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    NVML_SUCCESS, NVML_ERROR_NOT_SUPPORTED, NVML_GPM_METRICS_GET_VERSION = 0, 3, 1
    ENGINES = 7

    class c_nvmlGpmMetricsGet_t:
        def __init__(self):
            self.metrics = [types.SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(16)]

    def __init__(self):
        super().__init__("pynvml")
        self.calls, self.shut, self.gpm_live = 0, False, 0
        for i in range(8):
            setattr(self, f"NVML_GPM_METRIC_NVDEC_{i}_UTIL", 30 + i)

    def nvmlGpmQueryDeviceSupport(self, h):
        return types.SimpleNamespace(isSupportedDevice=int(h[1] != 5))

    def nvmlGpmSampleAlloc(self):
        self.gpm_live += 1
        return object()

    def nvmlGpmSampleGet(self, h, sample):
        return sample

    def nvmlGpmSampleFree(self, sample):
        self.gpm_live -= 1

    def nvmlGpmMetricsGet(self, query):
        assert query.version == 1 and query.sample1 is not None and query.sample2 is not None
        for m in query.metrics[:query.numMetrics]:
            engine = m.metricId - 30
            m.nvmlReturn, m.value = ((0, 90.0 if engine == 2 else 10.0) if engine < self.ENGINES
                                     else (self.NVML_ERROR_NOT_SUPPORTED, 0.0))
        return query

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        return 8

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("gpu", i)

    def nvmlDeviceGetUtilizationRates(self, h):
        self.calls += 1
        return types.SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetDecoderUtilization(self, h):
        return [93, 167000]

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=30 * 2**30, total=80 * 2**30, free=50 * 2**30)

    def nvmlDeviceGetPowerUsage(self, h):
        return 412_500  # mW

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if h[1] == 5:
            raise self.NVMLError_NotSupported()
        return 7_200_000  # mJ


def test_nvml_series_in_base_units_for_the_ranks_gpu(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")  # local rank 1 is cuda:1 = NVML device 7
    m = prom.PrometheusMetrics(cfg(nvml_interval=0.05), rank=9, local_rank=1, run="r")
    try:
        first = fake.calls
        assert wait_for(lambda: fake.calls >= first + 2, 60, poll=0.01)  # the thread samples every 0.05 s
        text = scrape(m.url)
    finally:
        m.close()
    assert fake.shut and fake.gpm_live == 0  # every GPM sample freed
    assert promtool("check", "metrics", stdin=text).returncode == 0
    got = {s.name: s for f in families(text).values() for s in f.samples if s.name.startswith("tubelet_gpu_")}
    engines = {s.labels["engine"]: s.value for f in families(text).values() for s in f.samples
               if s.name == "tubelet_gpu_decoder_engine_utilization_ratio"}
    assert engines == {str(i): 0.9 if i == 2 else 0.1 for i in range(7)}  # 7 engines; the busy one shows
    got = {n: s for n, s in got.items() if n != "tubelet_gpu_decoder_engine_utilization_ratio"}
    assert {n: s.labels for n, s in got.items()} == {
        n if n != "tubelet_gpu_energy_joules" else n + "_total": {"gpu": "7", "rank": "9", "run": "r"}
        for n in GPU_NAMES}
    assert got["tubelet_gpu_utilization_ratio"].value == 0.87
    assert got["tubelet_gpu_decoder_utilization_ratio"].value == 0.93
    assert got["tubelet_gpu_memory_used_bytes"].value == 30 * 2**30
    assert got["tubelet_gpu_memory_total_bytes"].value == 80 * 2**30
    assert got["tubelet_gpu_power_watts"].value == 412.5
    assert got["tubelet_gpu_energy_joules_total"].value == 7200.0

    # a query the GPU does not support is dropped, the rest stays; nvml=false: no GPU series at all
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    with exporter(nvml_interval=60) as m:
        names = {n for n in families(scrape(m.url)) if n.startswith("tubelet_gpu_")}
    assert names == set(GPU_NAMES) - {"tubelet_gpu_energy_joules"}  # and GPU 5 has no GPM: no engine series
    with exporter(nvml=False) as m:
        assert not [n for n in families(scrape(m.url)) if n.startswith("tubelet_gpu_")]
    # no GPU for this local rank (2 visible, local rank 2): absent, no failure
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    m = prom.PrometheusMetrics(cfg(), rank=2, local_rank=2)
    try:
        assert not [n for n in families(scrape(m.url)) if n.startswith("tubelet_gpu_")]
    finally:
        m.close()


def test_port_in_use_is_a_clear_error_naming_the_port_and_the_key():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"127\.0\.0\.1:{port} \(metrics\.base_port={port - 1} \+ "
                                               r"local_rank 1\).*metrics\.base_port=.*metrics\.enabled=false"):
            prom.PrometheusMetrics(MetricsConfig(base_port=port - 1), rank=1, local_rank=1)


def test_build_metrics_picks_the_backend():
    assert isinstance(build_metrics(MetricsConfig(enabled=False), 0, 0), NullMetrics)
    m = build_metrics(cfg(nvml=False), 3, 0)
    try:
        assert isinstance(m, prom.PrometheusMetrics) and m.url
        with pytest.raises(ValueError, match="'stop' or 'skip'"):
            m.nonfinite(1, "retry")
    finally:
        m.close()


@pytest.mark.slow
def test_the_final_state_is_scraped_before_close_returns():
    """close() marks the run as no longer running and, when something scrapes the endpoint, waits for one more
    scrape: Prometheus sees how the run ended (here a non-finite stop)."""
    with exporter(nvml=False, final_scrape_s=60.0) as m:  # nobody ever scraped: close() does not wait
        m.nonfinite(7, "stop")
        t0 = time.monotonic()
        m.close()
        assert time.monotonic() - t0 < 30  # a wait would take the whole 60 s
    m = prom.PrometheusMetrics(cfg(nvml=False, final_scrape_s=120.0), rank=0, local_rank=0, run="r")
    m.started(0, 0, 600)
    assert families(scrape(m.url))["tubelet_train_running"].samples[0].value == 1  # a Prometheus is watching
    m.nonfinite(7, "stop")
    closer = threading.Thread(target=m.close)
    closer.start()
    # close() first marks the end (running 0), then waits: once it has, it must still be waiting for the scrape
    assert wait_for(lambda: m.running._value.get() == 0, 60, poll=0.01)
    assert closer.is_alive()  # waits for the next scrape...
    fams = families(scrape(m.url))
    closer.join(timeout=60)
    assert not closer.is_alive()  # ...and returns once it came
    stop = fams["tubelet_train_nonfinite_stop"].samples[0]
    assert stop.value == 1 and stop.labels == {"rank": "0", "run": "r"}
    assert fams["tubelet_train_running"].samples[0].value == 0


# -- rules and configs ------------------------------------------------------------------------------


def test_promtool_check_config_and_rules():
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    r = promtool("check", "rules", "rules/recording.yml", "rules/alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([tool("amtool"), "check-config", "alertmanager.yml"], capture_output=True, text=True, cwd=MON)
    assert r.returncode == 0, r.stdout + r.stderr


def test_default_ports_leave_the_exporters_of_a_gpu_node_alone():
    """Not node-exporter's 9100, dcgm-exporter's 9400, Prometheus' 9090, Pushgateway's 9091 or Alertmanager's 9093:
    neither the trainer's default ports nor anything make monitor scrapes."""
    taken = {9090, 9091, 9093, 9100, 9400}
    base = MetricsConfig().base_port
    assert not taken & set(range(base, base + 8))
    conf = yaml.safe_load((MON / "prometheus.yml").read_text())
    scraped = {int(t.rsplit(":", 1)[1]) for c in conf["scrape_configs"] for sc in c["static_configs"]
               for t in sc["targets"]}
    assert scraped == set(range(base, base + 8)) | {19390} and not taken & scraped
    assert conf["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]


def test_alert_rules_unit_tests():
    """rules/alerts_test.yml: every alert with firing and non-firing cases, recording rules' values."""
    r = promtool("test", "rules", "rules/alerts_test.yml")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    tests = yaml.safe_load((MON / "rules" / "alerts_test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    alerts = [r["alert"] for g in yaml.safe_load((MON / "rules" / "alerts.yml").read_text())["groups"]
              for r in g["rules"]]
    for a in alerts:
        assert any(c["alertname"] == a and c["exp_alerts"] for c in cases), f"{a}: no firing case"
        assert any(c["alertname"] == a and not c["exp_alerts"] for c in cases), f"{a}: no non-firing case"


def test_dashboard_and_provisioning_are_consistent():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    names = {v["name"]: v for v in dash["templating"]["list"]}
    assert names["datasource"]["type"] == "datasource" and names["datasource"]["query"] == "prometheus"
    assert names["rank"]["includeAll"] and names["rank"]["allValue"] == ".*"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
        assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
    ds = yaml.safe_load((MON / "grafana/provisioning/datasources/tubelet.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://127.0.0.1:9090" and ds["uid"]
    prov = yaml.safe_load((MON / "grafana/provisioning/dashboards/tubelet.yml").read_text())["providers"][0]
    assert prov["type"] == "file" and prov["options"]["path"]


# -- a real Prometheus scraping a 2-rank job -------------------------------------------------------

RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval is at a 1 s scrape interval and a short time range


SHARDING = ("tubelet_shards", "$shards_run")  # the sharding row and variable: empty while only training runs


def dashboard_queries(job: str, run: str, shards_run: str = "") -> list:
    """(panel title, expr) of every panel target, with the dashboard variables substituted."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            e = (t["expr"].replace("$__rate_interval", RATE_INTERVAL).replace("$job", job).replace("$rank", ".*")
                 .replace("$shards_run", shards_run).replace("$run", run))
            assert "$" not in e, f"{p['title']}: unknown variable in {e}"
            out.append((p["title"], e))
    return out


def variable_queries(job: str, run: str) -> list:
    """(variable, selector, label) of the dashboard's label_values() variables."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"].replace("$job", job).replace("$run", run)
            assert q.startswith("label_values(") and q.endswith(")")
            selector, label = q[len("label_values("):-1].rsplit(",", 1)
            out.append((v["name"], selector.strip(), label.strip()))
    return out


def recording_rules() -> list:
    groups = yaml.safe_load((MON / "rules" / "recording.yml").read_text())["groups"]
    return sorted({r["record"] for g in groups for r in g["rules"]})


def free_ports(n: int) -> int:
    """A base port with base..base+n-1 free on loopback."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for p in range(base, base + n):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports")


def short_rules(tmp: Path, path: Path) -> Path:
    """A copy of a rule file with every `for:` cut to 3 s."""
    rules = yaml.safe_load(path.read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            if "for" in r:
                r["for"] = "3s"
    out = tmp / f"short-{path.name}"
    out.write_text(yaml.safe_dump(rules))
    return out


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.2)


class Webhook:
    """A local HTTP receiver of Alertmanager's webhook notifications: what a team's alert channel would get."""

    def __init__(self):
        import http.server

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self) -> list:
        """(alertname, status, labels) of every alert notified so far."""
        return [(a["labels"]["alertname"], a["status"], a["labels"]) for n in self.received for a in n["alerts"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Alertmanager:
    """configs/monitoring/alertmanager.yml, its webhook pointed at `webhook`, grouping waits cut to 1 s."""

    def __init__(self, tmp: Path, webhook: str):
        conf = yaml.safe_load((MON / "alertmanager.yml").read_text())
        conf["route"].update(group_wait="1s", group_interval="1s")
        conf["receivers"][0]["webhook_configs"][0]["url"] = webhook
        (tmp / "alertmanager.yml").write_text(yaml.safe_dump(conf))
        self.addr = f"127.0.0.1:{free_ports(1)}"
        self.log = open(tmp / "alertmanager.log", "w")
        self.proc = subprocess.Popen(
            [tool("prometheus-alertmanager"), f"--config.file={tmp / 'alertmanager.yml'}",
             f"--storage.path={tmp / 'am'}", f"--web.listen-address={self.addr}", "--cluster.listen-address="],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_ready(f"http://{self.addr}/-/ready", self.proc, tmp / "alertmanager.log")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.log.close()


class Prometheus:
    """configs/monitoring/prometheus.yml with its rules, scraping `targets` every second, on a free port.

    The rules are loaded with every `for:` cut to 3 s (their real durations are what promtool's unit tests
    check; here the point is that provoked failures make them fire). `alertmanager`: its address, where alerts
    go; `shards`: the sharding job's targets."""

    def __init__(self, tmp: Path, targets: list, job: str = "tubelet", alertmanager: str = "", shards: list = ()):
        conf = yaml.safe_load((MON / "prometheus.yml").read_text())
        conf["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
        conf["rule_files"] = [str(short_rules(tmp, MON / f)) for f in conf["rule_files"]]
        scrape_cfg = {c["job_name"]: c for c in conf["scrape_configs"]}
        assert set(scrape_cfg) == {job, "tubelet-shards"}
        scrape_cfg[job]["static_configs"] = [{"targets": targets}]
        scrape_cfg["tubelet-shards"]["static_configs"] = [{"targets": list(shards)}] if shards else []
        conf["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [alertmanager]}] if alertmanager else []
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(conf))
        self.job = job
        self.url = f"http://127.0.0.1:{free_ports(1)}"
        self.log = open(tmp / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address={self.url[len('http://'):]}"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_ready(self.url + "/-/ready", self.proc, tmp / "prometheus.log")
        # targets reach the scrape loop a few seconds after start (service discovery sends its first update then)
        want = len(targets) + len(shards)
        if not wait_for(lambda: len(self.api("targets")["activeTargets"]) >= want, 90, poll=0.2):
            self.close()
            raise RuntimeError(f"Prometheus has not taken its {want} targets after 90 s: "
                               f"{(tmp / 'prometheus.log').read_text()[-2000:]}")

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float) -> list:
        return self.api("query", query=expr, time=f"{at:.3f}")["result"]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def missing_data(p: Prometheus, ranks: list, gpu: bool, run: str) -> list:
    """Why the dashboard and the recording rules do not (yet) all show data now; [] when they do."""
    at, why = time.time(), []
    for title, expr in dashboard_queries(p.job, run):
        if "tubelet_gpu_" in expr and not gpu or "tubelet_shards" in expr or "tubelet_loader_cache" in expr:
            continue  # GPU-only panels (no NVML series without a GPU), sharding's (no sharding job here) and the
            # object-storage cache's (a local set here; tests/test_remote.py covers them)
        res = p.query(expr, at)
        values = [float(r["value"][1]) for r in res]
        if not res or not all(math.isfinite(v) for v in values):
            why.append(f"panel {title!r}: {expr} -> {values}")
        elif "by (rank" in expr and sorted(r["metric"]["rank"] for r in res) != ranks:
            why.append(f"panel {title!r}: {expr} -> ranks {[r['metric'].get('rank') for r in res]}")
    for name, selector, label in variable_queries(p.job, run):
        if "tubelet_shards" in selector:
            continue
        got = sorted({r["metric"].get(label) for r in p.query(selector, at)} - {None})
        if not got or (name == "rank" and got != ranks):
            why.append(f"variable {name}: {selector} -> {got}")
    for rule in recording_rules():
        if "tubelet_shards" in rule:
            continue
        res = p.query(rule, at)
        if not res or not all(math.isfinite(float(r["value"][1])) for r in res):
            why.append(f"recording rule {rule} -> {[r['value'][1] for r in res]}")
    return why


def check_dashboards_against(p: Prometheus, procs: list, ranks: list, timeout: float, log: Path = None,
                             run: str = "run") -> None:
    """Polls until every panel query, variable and recording rule returns data for all ranks at one instant
    while the job runs; fails (naming what is empty) when the job ends or `timeout` passes first."""
    gpu = bool(p.query("tubelet_gpu_utilization_ratio", time.time()))
    deadline = time.monotonic() + timeout
    why = ["not queried"]
    while time.monotonic() < deadline and all(q.poll() is None for q in procs):
        why = missing_data(p, ranks, gpu, run)
        if not why:
            break
        time.sleep(1)
    ended = [q.returncode for q in procs if q.poll() is not None]
    assert not why, ("empty panels or rules" + (f" (the job ended: exit {ended})" if ended else "") + ":\n"
                     + "\n".join(why) + (f"\njob log:\n{log.read_text()[-3000:]}" if log else ""))
    rules = p.api("rules")["groups"]
    bad = [(r["name"], r.get("lastError")) for g in rules for r in g["rules"] if r["health"] == "err"]
    assert not bad, bad
    assert {r["name"] for g in rules for r in g["rules"]} >= set(recording_rules())


FEEDER = """
import sys, time
from pipeline.clips import LoaderStats
from train.config import MetricsConfig
from train.metrics import build_metrics
from train.step import StepStats
rank, base, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
m = build_metrics(MetricsConfig(base_port=base, final_scrape_s=5), rank=rank, local_rank=rank, run="feeder")
t_end, step = time.monotonic() + seconds, 0
while time.monotonic() < t_end:
    step += 1
    t0 = time.perf_counter(); time.sleep(0.01 * (rank + 1)); wait = time.perf_counter() - t0
    m.loader(LoaderStats(wait, 0.02, 0.05, 1_000_000, 4, 0, 2, step // 50, 4 * step))
    time.sleep(0.05)
    m.step(StepStats(step, time.perf_counter() - t0, wait, 4, 1.0 / step, 1e-4, 0.04, 0.998, 2.0))
    if step % 10 == 0:
        m.checkpoint(step, 0.01)
    if step == 1:
        m.started(0, 0, 600.0)
    if step % 5 == 0:
        m.signals({f"{source}_{name}": 0.5 for source in ("target", "pred")
                   for name in ("std", "erank", "clip_share", "position_share")})
m.close()
"""


@pytest.mark.slow
def test_dashboards_and_rules_on_two_exporters(tmp_path):
    """Two processes feed PrometheusMetrics like two ranks; a real Prometheus scrapes them; every panel, the
    dashboard variables and every recording rule return data for both ranks."""
    base = free_ports(2)
    p = Prometheus(tmp_path, [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"])
    procs = []
    try:
        procs = [subprocess.Popen([sys.executable, "-c", FEEDER, str(r), str(base), "900"], cwd=ROOT)
                 for r in (0, 1)]  # they feed until the panels are seen (or the bound), then are stopped
        check_dashboards_against(p, procs, ["0", "1"], timeout=300, run="feeder")
    finally:
        for q in procs:
            q.terminate()
            q.wait(timeout=10)
        p.close()


def torchrun(tmp_path: Path, shards: str, base_port: int, log: Path, env=None, **overrides) -> subprocess.Popen:
    """`torchrun --nproc-per-node=2 -m train.trainer` on the tiny CPU config with metrics on, in its own session."""
    args = {"data.root": shards, "run_dir": tmp_path / "run", "metrics.enabled": "true",
            "metrics.base_port": base_port, "data.batch_size": 2, "data.threads": 1, "schedule.total_steps": 1000,
            "optim.warmup_steps": 5, "checkpoint.every_steps": 5, "checkpoint.keep_last": 1, "log_every": 10,
            **overrides}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "train.trainer",
           "--config", str(ROOT / "configs/train/cpu.yaml"), *[f"{k}={v}" for k, v in args.items()]]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})


def stop(job: subprocess.Popen) -> None:
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGTERM)  # torchrun and its workers (their own session)
        try:
            job.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


@pytest.mark.slow
def test_dashboards_and_rules_on_a_torchrun_training_run(tmp_path, small_shards):
    """A 2-rank CPU training run scraped every second by a real Prometheus: every panel, the dashboard
    variables and every recording rule return data for both ranks while it trains; the job is stopped once
    they do (or the test fails after a time limit)."""
    base = free_ports(2)
    p = Prometheus(tmp_path, [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"])
    job = torchrun(tmp_path, small_shards, base, tmp_path / "train.log")
    try:
        check_dashboards_against(p, [job], ["0", "1"], timeout=400, log=tmp_path / "train.log")
        # the trainer's numbers as Prometheus has them: 2 clips per step on each rank, checkpoints on rank 0
        at = time.time()
        per_step = p.query("tubelet_train_clips_total / tubelet_train_steps_total", at)
        assert sorted(r["metric"]["rank"] for r in per_step) == ["0", "1"]
        assert all(float(r["value"][1]) == 2 for r in per_step), per_step
        ckpt = p.query("tubelet_train_checkpoint_step", at)
        assert [r["metric"]["rank"] for r in ckpt] == ["0"] and float(ckpt[0]["value"][1]) % 5 == 0, ckpt
    finally:
        stop(job)
        p.close()


def rules_evaluated_after(p: Prometheus, t: float) -> bool:
    """Every rule group of `p` has been evaluated after time `t` (seconds since the epoch)."""
    import calendar
    import re

    groups = p.api("rules")["groups"]
    times = []
    for g in groups:  # lastEvaluation: RFC 3339 in UTC, nanoseconds ("0001-01-01T00:00:00Z" before the first)
        m = re.match(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?Z", g.get("lastEvaluation", ""))
        if not m:
            return False
        times.append(calendar.timegm(tuple(int(x) for x in m.groups()[:6])) + float(m.group(7) or 0))
    return bool(groups) and min(times) > t


def firing(p: Prometheus, name: str) -> list:
    return [a["labels"] for a in p.api("alerts")["alerts"] if a["labels"]["alertname"] == name and a["state"] == "firing"]


def wait_for(what, timeout: float, poll: float = 0.5):
    """The first truthy what() within `timeout` seconds, else the last value."""
    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(poll)
    return value


def wait_exit(job: subprocess.Popen, log, quiet_s: float = 240, limit_s: float = 1800) -> int:
    """The job's exit status, however slow the machine: it may take as long as it keeps writing its log; it fails
    only after `quiet_s` seconds without a new byte in `log` (a hung job) or `limit_s` in all."""
    deadline, size, heard = time.monotonic() + limit_s, -1, time.monotonic()
    while (code := job.poll()) is None:
        now, grown = time.monotonic(), log.stat().st_size if log.exists() else 0
        if grown != size:
            size, heard = grown, now
        if now - heard > quiet_s or now > deadline:
            raise AssertionError(f"the job neither ended nor logged for {now - heard:.0f} s:\n"
                                 + log.read_text()[-3000:])
        time.sleep(0.5)
    return code


def rank_pids(job: subprocess.Popen) -> dict:
    """RANK -> pid of torchrun's worker processes (its children, in sessions of their own)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [e[len(b"RANK="):].decode() for e in env if e.startswith(b"RANK=")]
        if ppid == job.pid and ranks:
            out[int(ranks[0])] = int(pid)
    return out


@pytest.mark.slow
def test_a_nan_stop_reaches_prometheus_fires_its_alerts_and_reaches_the_webhook(tmp_path, small_shards):
    """The trainer stops on a NaN loss at step 3 (fault injection) and exits; its ranks wait for one more scrape,
    so the stop is stored: TubeletNonFiniteStop and TubeletRunEndedWithoutCheckpoint fire after the processes
    are gone (step 3 is past the last checkpoint), and Alertmanager hands them to the team's webhook."""
    base = free_ports(2)
    hook = Webhook()
    am = Alertmanager(tmp_path, hook.url)
    p = Prometheus(tmp_path, [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"], alertmanager=am.addr)
    log = tmp_path / "train.log"
    job = torchrun(tmp_path, small_shards, base, log, env={"TUBELET_FAULT_NAN": "3"})
    try:
        assert wait_exit(job, log) != 0, log.read_text()[-3000:]
        assert "non-finite loss or gradient at step 3" in log.read_text()
        stopped = wait_for(lambda: firing(p, "TubeletNonFiniteStop"), 60)
        assert stopped, log.read_text()[-3000:]
        assert {a["rank"] for a in stopped} <= {"0", "1"} and all(a["severity"] == "critical" for a in stopped)
        assert all(a["run"] == "run" for a in stopped)  # the run's identity: its folder's name
        lost = wait_for(lambda: firing(p, "TubeletRunEndedWithoutCheckpoint"), 60)
        assert [(a["run"], a["rank"]) for a in lost] == [("run", "0")], lost
        # the job is gone: every target's `up` is 0 once a scrape after its exit has failed (1 s interval; a
        # query right after the alerts could land between the exit and that scrape)
        gone = wait_for(lambda: p.query("up", time.time()) and not p.query("up == 1", time.time()), 60)
        assert gone, p.query("up", time.time())
        assert not firing(p, "TubeletRankDown")  # it ended, it was not lost
        got = wait_for(lambda: {n for n, status, _ in hook.alerts() if status == "firing"}
                       >= {"TubeletNonFiniteStop", "TubeletRunEndedWithoutCheckpoint"}, 60)
        assert got, hook.alerts()
    finally:
        stop(job)
        p.close()
        am.close()
        hook.close()


@pytest.mark.slow
def test_a_frozen_and_a_killed_rank_alert_before_the_collective_timeout(tmp_path, small_shards):
    """2 ranks, collective timeout 60 s. SIGSTOP rank 0: it stops answering scrapes (TubeletRankDown, with the
    run's identity) and rank 1 waits in a collective (TubeletNoProgress after a third of the timeout), both long
    before the collective gives up; Alertmanager notifies the down rank (it inhibits the peer's no-progress).
    Then kill -9 rank 1: down too."""
    base = free_ports(2)
    hook = Webhook()
    am = Alertmanager(tmp_path, hook.url)
    p = Prometheus(tmp_path, [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"], alertmanager=am.addr)
    log = tmp_path / "train.log"
    job = torchrun(tmp_path, small_shards, base, log, dist_timeout_s=60)
    try:
        assert wait_for(lambda: len(p.query("tubelet_train_step > 2", time.time())) == 2, 120), log.read_text()[-3000:]
        pids = rank_pids(job)
        assert sorted(pids) == [0, 1], pids
        frozen_at = time.monotonic()
        os.kill(pids[0], signal.SIGSTOP)
        down = wait_for(lambda: firing(p, "TubeletRankDown"), 40)
        assert [(a["run"], a["rank"]) for a in down] == [("run", "0")], down
        stuck = wait_for(lambda: firing(p, "TubeletNoProgress"), 40)
        assert [(a["run"], a["rank"]) for a in stuck] == [("run", "1")], stuck
        assert time.monotonic() - frozen_at < 50  # before rank 1's collective gives up (60 s)
        notified = wait_for(lambda: [lab for n, st, lab in hook.alerts() if n == "TubeletRankDown" and st == "firing"],
                            60)
        assert notified and notified[0]["run"] == "run" and notified[0]["rank"] == "0", hook.alerts()
        assert not [n for n, _, _ in hook.alerts() if n == "TubeletNoProgress"]  # inhibited by the down rank
        os.kill(pids[1], signal.SIGKILL)
        both = wait_for(lambda: len(firing(p, "TubeletRankDown")) == 2, 60)
        assert both, firing(p, "TubeletRankDown")
    finally:
        for pid in rank_pids(job).values():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        stop(job)
        p.close()
        am.close()
        hook.close()


@pytest.mark.slow
def test_a_slow_loader_fires_the_data_stall_alert_and_the_end_of_the_run_is_scraped(tmp_path, small_shards):
    """A loader that keeps every batch waiting half as long as the step before it took (a third of each step
    waits for data, however busy the machine): TubeletDataStall fires while the run trains. The run then ends: its
    final step, its final checkpoint and running=0 are scraped before the process exits, so Prometheus holds
    them, and nothing says the run was lost or unsaved."""
    base = free_ports(1)
    p = Prometheus(tmp_path, [f"127.0.0.1:{base}"])
    log = tmp_path / "train.log"
    cmd = [sys.executable, "-m", "train.trainer", "--config", str(ROOT / "configs/train/cpu.yaml"),
           f"data.root={small_shards}", f"run_dir={tmp_path / 'slow'}", "metrics.enabled=true",
           f"metrics.base_port={base}", "data.batch_size=2", "data.threads=1", "schedule.total_steps=60",
           "optim.warmup_steps=5", "checkpoint.every_steps=25", "log_every=10"]
    with open(log, "w") as out:
        job = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "TUBELET_FAULT_SLOW_LOADER": "0.5x"})
    try:
        stall = wait_for(lambda: firing(p, "TubeletDataStall") or job.poll() is not None, 600)
        assert stall is not True and stall and stall[0]["run"] == "slow", log.read_text()[-3000:]
        assert wait_exit(job, log) == 0, log.read_text()[-3000:]
        at = time.time()
        final = {name: [float(r["value"][1]) for r in p.query(f"last_over_time({name}[1m])", at)]
                 for name in ("tubelet_train_step", "tubelet_train_checkpoint_step", "tubelet_train_running")}
        assert final == {"tubelet_train_step": [60.0], "tubelet_train_checkpoint_step": [60.0],
                         "tubelet_train_running": [0.0]}, final
        # the alerts that must stay quiet had their chance: every rule was evaluated past the end plus their
        # shortened `for` (3 s), twice
        assert wait_for(lambda: rules_evaluated_after(p, at + 3 + 2), 60), p.api("rules")
        assert not firing(p, "TubeletRankDown") and not firing(p, "TubeletRunEndedWithoutCheckpoint")
    finally:
        stop(job)
        p.close()


@pytest.mark.slow
def test_sharding_progress_reaches_prometheus_as_a_percentage_with_eta(tmp_path, monkeypatch):
    """make shards serving its progress, scraped by the real Prometheus: the expected total, the counts by
    result and by reason (present at 0 before the first reject), the progress and time-left rules and every
    sharding panel while the job runs; the end (running 0) is scraped before the job stops serving.

    However busy the machine, the job is seen while it runs: halfway through, it waits (in its result handler)
    until Prometheus shows it running with every sharding panel filled, or 120 s have passed."""
    import videos
    from common.config import load_config
    from shards.build import run as run_shards
    from shards.config import ShardsConfig
    from shards.metrics import ShardsMetrics

    src = tmp_path / "in"
    for i in range(16):
        videos.write_video(src / f"v{i}.webm", "libvpx-vp9", 128, 96, 12, 48)
    videos.write_empty(src / "empty.mp4")
    port = free_ports(1)
    p = Prometheus(tmp_path, [f"127.0.0.1:{free_ports(1)}"], shards=[f"127.0.0.1:{port}"])
    panels = [(title, expr) for title, expr in dashboard_queries("tubelet", "", shards_run="set")
              if "tubelet_shards" in expr and "eta" not in expr]  # time left: none once the rate is 0 at the end
    live = {}  # when Prometheus had the running job's progress and panels, and what was still empty then

    def missing_while_running() -> list:
        at = time.time()
        running = p.query('run:tubelet_shards_progress:ratio and on (run) tubelet_shards_running == 1', at)
        missing = [] if running else ["the progress of a running job"]
        missing += [f"panel {title!r}: {expr}" for title, expr in panels if not p.query(expr, at)]
        live.update(at=at, missing=missing)
        return missing

    real_sample, sampled = ShardsMetrics.sample, []

    def sample(self, *args):
        real_sample(self, *args)
        sampled.append(1)
        if len(sampled) == 8:  # halfway: hold the job until Prometheus shows it running, every panel filled
            wait_for(lambda: not missing_while_running(), 120)

    monkeypatch.setattr(ShardsMetrics, "sample", sample)
    try:
        cfg = load_config(ShardsConfig, None, [f"inputs.train={src}", f"output={tmp_path / 'set'}", "workers=1",
                                               "progress=false", f"metrics_port={port}"])
        run_shards(cfg)
        assert live and not live["missing"], f"while the sharding job ran, Prometheus lacked: {live}"
        at = time.time()

        def last(expr: str) -> dict:
            return {tuple(sorted(r["metric"].items())): float(r["value"][1])
                    for r in p.query(f"last_over_time({expr}[5m])", at)}

        assert list(last('tubelet_shards_videos_expected{run="set"}').values()) == [17.0]
        by_result = {dict(k)["result"]: v for k, v in last('tubelet_shards_videos_total{run="set"}').items()}
        assert by_result == {"sharded": 16.0, "rejected": 1.0}
        reasons = {dict(k)["reason"]: v for k, v in last('tubelet_shards_rejected_total{run="set"}').items()}
        assert reasons["empty_file"] == 1.0 and reasons["truncated"] == 0.0  # every reason, from 0
        assert list(last('tubelet_shards_running{run="set"}').values()) == [0.0]  # the end was scraped
        assert sum(by_result.values()) == 17.0  # 100% at the end
        assert not p.query('{__name__=~"tubelet_shards_.*_created"}', live["at"])  # no _created series
    finally:
        p.close()
