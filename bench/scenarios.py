"""One LoadGen run of one scenario against one system, and what its summary says.

LoadGen generates the load (SingleStream: next query when the last one completes; MultiStream: the
same with ``cameras`` samples a query; Server: Poisson arrivals at ``target_qps`` timed from the
scheduled send; Offline: every sample at once), computes the percentiles and early-stopping estimates
and judges the run VALID or INVALID. Its log files are written to the run's directory and the summary
(``mlperf_log_summary.txt``) is parsed here; nothing is recomputed.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen_sut import LoadGenSUT

SCENARIOS = ("single-stream", "multi-stream", "server", "offline")
_LG_NAME = {"single-stream": "SingleStream", "multi-stream": "MultiStream", "server": "Server", "offline": "Offline"}
# What each scenario's request asks for: robot scenarios want dense patch tokens, VLM/offline CLS.
REQUEST = {"single-stream": "features", "multi-stream": "features", "server": "embed", "offline": "embed"}
# Early stopping needs this many queries for a p90 (SingleStream) and a p99 (MultiStream, Server)
# estimate (loadgen/early_stopping.cc, all queries under the bound); fewer cannot be VALID.
EARLY_STOPPING_QUERIES = {"single-stream": 64, "multi-stream": 662, "server": 662, "offline": 1}
# --mlperf-strict: MLPerf Inference's mlperf.conf (10 minutes; its query counts).
STRICT_MIN_DURATION_MS = 600_000
STRICT_MIN_QUERIES = {"single-stream": 1024, "multi-stream": 270_336, "server": 270_336, "offline": 1}


@dataclass(frozen=True)
class ScenarioConfig:
    """The LoadGen settings of one run (``None``: LoadGen's default or an automatic value, see cli)."""

    scenario: str
    min_duration_ms: int = 3000
    min_query_count: int | None = None  # None: EARLY_STOPPING_QUERIES
    cameras: int = 4
    target_qps: float = 10.0
    latency_bound_ms: float = 200.0
    expected_latency_ms: float = 50.0
    offline_expected_qps: float = 100.0
    find_peak: bool = False
    accuracy: bool = False
    max_duration_ms: int = 0

    def settings(self) -> Any:
        import mlperf_loadgen as lg

        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        s = lg.TestSettings()
        s.scenario = getattr(lg.TestScenario, _LG_NAME[self.scenario])
        if self.accuracy:
            s.mode = lg.TestMode.AccuracyOnly
        elif self.find_peak and self.scenario == "server":
            s.mode = lg.TestMode.FindPeakPerformance
            s.server_find_peak_qps_decimals_of_precision = 0
        else:
            s.mode = lg.TestMode.PerformanceOnly
        s.min_duration_ms = int(self.min_duration_ms)
        s.min_query_count = int(self.min_query_count if self.min_query_count is not None
                                else EARLY_STOPPING_QUERIES[self.scenario])
        if self.max_duration_ms:
            s.max_duration_ms = int(self.max_duration_ms)
        s.single_stream_expected_latency_ns = int(self.expected_latency_ms * 1e6)
        s.multi_stream_expected_latency_ns = int(self.expected_latency_ms * 1e6)
        s.multi_stream_samples_per_query = int(self.cameras)
        s.server_target_qps = float(self.target_qps)
        s.server_target_latency_ns = int(self.latency_bound_ms * 1e6)
        s.offline_expected_qps = float(self.offline_expected_qps)
        return s


@dataclass
class ScenarioResult:
    """A run's verdict, metric and figures as LoadGen's summary states them, plus the SUT's counts."""

    scenario: str
    system: str
    mode: str
    valid: bool | None  # None: accuracy mode (no verdict)
    metric_name: str
    metric: float | None
    fields: dict[str, str]
    failed_checks: list[str]
    advice: list[str]
    log_dir: str
    settings: dict[str, Any]
    deadline_miss: float | None = None
    peak_qps: float | None = None
    sut_errors: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "-" if self.valid is None else ("VALID" if self.valid else "INVALID")

    def ns(self, key: str) -> float | None:
        """A latency field of the summary in ms (``key`` without `` (ns)``)."""
        v = self.fields.get(f"{key} (ns)")
        return float(v) / 1e6 if v is not None else None

    @property
    def p99_ms(self) -> float | None:
        return self.ns("99.00 percentile latency")

    @property
    def samples_per_s(self) -> float | None:
        """Completed samples per second as LoadGen states it for this scenario."""
        for key in ("Samples per second", "Completed samples per second"):
            if key in self.fields:
                return float(self.fields[key])
        if self.scenario == "multi-stream":  # queries run back to back: cameras per mean query latency
            mean = self.ns("Mean latency")
            return int(self.settings.get("cameras", 1)) * 1e3 / mean if mean else None
        qps = self.fields.get("QPS w/o loadgen overhead")
        return float(qps) if qps is not None else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(verdict=self.verdict, p99_ms=self.p99_ms, samples_per_s=self.samples_per_s)
        return d


_FIELD = re.compile(r"^\s*([^:*][^:]*?)\s*:\s*(\S.*?)\s*$")
_METRIC = {"single-stream": "90.0th percentile latency (ns)", "multi-stream": "99.0th percentile latency (ns)",
           "server": "Completed samples per second", "offline": "Samples per second"}


def parse_summary(text: str, scenario: str) -> dict[str, Any]:
    """``{"valid", "metric_name", "metric", "fields", "failed_checks", "advice"}`` of a LoadGen summary.

    ``failed_checks``: the ``... satisfied : NO`` lines; ``advice``: the lines of its Recommendations and
    Early Stopping Result sections (what LoadGen says to change)."""
    fields: dict[str, str] = {}
    failed, advice, section = [], [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("Recommendations") or stripped.startswith("Early Stopping Result"):
            section = "advice"
            continue
        if stripped.startswith("====="):
            section = None
            continue
        if section == "advice" and stripped:
            if stripped.startswith("*") or not advice:
                advice.append(stripped.lstrip("* ").strip())
            else:
                advice[-1] += " " + stripped
            continue
        m = _FIELD.match(line)
        if m:
            key, value = m.group(1), m.group(2)
            fields.setdefault(key, value)
            if "satisfied" in key and value.upper().startswith("NO"):
                failed.append(key)
    result = fields.get("Result is")
    metric_name = _METRIC[scenario]
    metric = fields.get(metric_name)
    return {"valid": None if result is None else result == "VALID", "metric_name": metric_name,
            "metric": float(metric) if metric is not None else None, "fields": fields,
            "failed_checks": failed, "advice": advice}


_PEAK = re.compile(r"Found peak performance field: ([0-9.]+)")


def read_accuracy_log(log_dir: str | Path, shape: tuple[int, ...]) -> dict[int, np.ndarray]:
    """``{qsl_idx: float32 array of shape}`` from LoadGen's ``mlperf_log_accuracy.json``."""
    entries = json.loads((Path(log_dir) / "mlperf_log_accuracy.json").read_text() or "[]")
    return {int(e["qsl_idx"]): np.frombuffer(bytes.fromhex(e["data"]), dtype=np.float32).reshape(shape)
            for e in entries}


def run_scenario(sut: LoadGenSUT, n_samples: int, config: ScenarioConfig, log_dir: str | Path,
                 control_hz: float | None = None) -> ScenarioResult:
    """Run ``config`` with LoadGen against ``sut`` over samples ``0..n_samples-1``; logs to ``log_dir``."""
    import mlperf_loadgen as lg

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    settings = config.settings()
    log_settings = lg.LogSettings()
    log_settings.log_output.outdir = str(log_dir)
    log_settings.log_output.copy_summary_to_stdout = False
    log_settings.enable_trace = False
    qsl = lg.ConstructQSL(n_samples, n_samples, lambda _: None, lambda _: None)  # samples are in RAM
    sut.reset_stats()
    try:
        lg.StartTestWithLogSettings(sut.handle, qsl, settings, log_settings)
    finally:
        lg.DestroyQSL(qsl)
    stats = sut.stats
    summary_path = log_dir / "mlperf_log_summary.txt"
    parsed = parse_summary(summary_path.read_text() if summary_path.is_file() else "", config.scenario)
    mode = "accuracy" if config.accuracy else ("find-peak" if settings.mode == lg.TestMode.FindPeakPerformance
                                               else "performance")
    peak = None
    if mode == "find-peak":
        detail = (log_dir / "mlperf_log_detail.txt").read_text()
        found = _PEAK.findall(detail)
        peak = float(found[-1]) if found else None
    miss = None
    if control_hz and config.scenario in ("single-stream", "multi-stream") and stats.query_latency_s:
        lat = np.asarray(stats.query_latency_s)
        miss = float(np.mean(lat > 1.0 / control_hz))
    valid, failed = (None if config.accuracy else parsed["valid"]), list(parsed["failed_checks"])
    if stats.errors:  # LoadGen cannot see a failed request: the run is not a measurement of the system
        valid = False if valid is not None else None
        failed.append(f"system under test raised on some queries: {stats.errors[0]}")
    return ScenarioResult(config.scenario, sut.system.name, mode, valid,
                          parsed["metric_name"], parsed["metric"], parsed["fields"], failed,
                          parsed["advice"], str(log_dir), asdict(config), miss, peak, list(stats.errors))
