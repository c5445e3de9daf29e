"""Counters and histograms for ``GET /metrics`` (Prometheus text format 0.0.4)."""

from __future__ import annotations

import threading
from collections import Counter

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.n += 1
        for i, edge in enumerate(BUCKETS):
            if value <= edge:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, total = [], 0
        sep = "," if labels else ""
        for edge, c in zip([*map(str, BUCKETS), "+Inf"], self.counts):
            total += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{edge}"}} {total}')
        lab = f"{{{labels}}}" if labels else ""
        return [*out, f"{name}_sum{lab} {self.sum:.6f}", f"{name}_count{lab} {self.n}"]


class Metrics:
    """Thread-safe counters updated by the routes and the engine's worker."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (method, route, status) -> count
        self.request_seconds: dict[str, Histogram] = {}
        self.question_seconds = Histogram()
        self.compress_seconds = Histogram()
        self.counters: Counter = Counter()  # generated_tokens, compressed_tokens, cache_hits, ...

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(method, route, status)] += 1
            self.request_seconds.setdefault(route, Histogram()).observe(seconds)

    def add(self, name: str, value: float = 1) -> None:
        with self.lock:
            self.counters[name] += value

    def observe(self, which: str, seconds: float) -> None:
        with self.lock:
            getattr(self, which).observe(seconds)

    def render(self, gauges: dict[str, float | dict[str, float]]) -> str:
        """The Prometheus exposition text; ``gauges`` are sampled by the caller."""
        help_ = {
            "generated_tokens": "answer tokens generated",
            "compressed_tokens": "document tokens compressed",
            "cache_hits": "questions whose memory was already loaded",
            "cache_misses": "questions whose memory was read from the store",
            "batches": "generate calls",
            "batched_questions": "questions answered (sum over generate calls)",
            "rejected_queue_full": "questions refused with 429",
            "sampled_tokens": "decode steps of rows whose question was still running (answered or not)",
            "cancelled_questions": "questions dropped or stopped because their client went away",
        }
        lines = ["# HELP rcc_requests_total HTTP requests by route and status", "# TYPE rcc_requests_total counter"]
        with self.lock:
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(f'rcc_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}')
            lines += ["# HELP rcc_request_seconds time to the response's first byte",
                      "# TYPE rcc_request_seconds histogram"]
            for route, h in sorted(self.request_seconds.items()):
                lines += h.lines("rcc_request_seconds", f'route="{route}"')
            for name, h, text in (("rcc_question_seconds", self.question_seconds, "question queued to answered"),
                                  ("rcc_compress_seconds", self.compress_seconds, "compression job run time")):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram", *h.lines(name)]
            for name, text in help_.items():
                lines += [f"# HELP rcc_{name}_total {text}", f"# TYPE rcc_{name}_total counter",
                          f"rcc_{name}_total {self.counters[name]:g}"]
        for name, value in gauges.items():
            lines += [f"# TYPE rcc_{name} gauge"]
            if isinstance(value, dict):
                lines += [f'rcc_{name}{{status="{k}"}} {v:g}' for k, v in value.items()]
            else:
                lines.append(f"rcc_{name} {value:g}")
        return "\n".join(lines) + "\n"
