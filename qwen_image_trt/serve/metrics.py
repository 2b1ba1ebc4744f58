"""Prometheus metrics on the server's own registry (several servers in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServeMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("qitrt_requests", "finished HTTP requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.images = Counter("qitrt_images", "images generated", registry=r)
        self.requeued = Counter("qitrt_requeued", "requests re-queued after their worker died", registry=r)
        self.outcomes = Counter("qitrt_outcomes", "how each request or async job ended: ok, error, timeout, "
                                "cancelled, rejected (refused at the door: queue full, shutting down)",
                                ["kind", "outcome"], registry=r)
        self.isolated = Counter("qitrt_isolated", "requests re-run alone after their batch failed", registry=r)
        self.restored = Counter("qitrt_jobs_restored", "unfinished jobs of an earlier run queued again at start",
                                registry=r)
        self.watchdog_kills = Counter("qitrt_watchdog_kills", "workers killed for missed heartbeats or a stalled "
                                      "batch", ["worker"], registry=r)
        self.busy = Counter("qitrt_worker_busy_seconds", "seconds each worker spent on batches", ["worker"],
                            registry=r)
        self.connections = Gauge("qitrt_open_connections", "client connections open now", registry=r)
        self.dropped_connections = Counter("qitrt_dropped_connections", "connections closed by the server: "
                                           "header timeout, over the connection cap", ["reason"], registry=r)
        self.queue_time = Histogram("qitrt_queue_seconds", "time from acceptance to dispatch", buckets=TIME_BUCKETS,
                                    registry=r)
        self.compute_time = Histogram("qitrt_compute_seconds", "pipeline time per batch", ["worker"],
                                      buckets=TIME_BUCKETS, registry=r)
        self.batch_images = Histogram("qitrt_batch_images", "images per pipeline call", buckets=BATCH_BUCKETS,
                                      registry=r)
        self.batch_requests = Histogram("qitrt_batch_requests", "requests per pipeline call", buckets=BATCH_BUCKETS,
                                        registry=r)
        self.embedding_cache = Counter("qitrt_embedding_cache", "prompt-embedding cache lookups in the workers: "
                                       "hits, misses (the text encoder ran) and evictions", ["event"], registry=r)
        self.queue_length = Gauge("qitrt_queue_length", "requests waiting for a batch", registry=r)
        self.worker_ready = Gauge("qitrt_worker_ready", "1 when the worker has loaded its pipeline",
                                  ["worker", "device"], registry=r)
        self.worker_in_flight = Gauge("qitrt_worker_in_flight_images", "images the worker is computing",
                                      ["worker", "device"], registry=r)
        self.worker_completed = Gauge("qitrt_worker_completed_images", "images the worker has finished",
                                      ["worker", "device"], registry=r)
        self.worker_restarts = Gauge("qitrt_worker_restarts", "times the worker process was restarted",
                                     ["worker", "device"], registry=r)

    def render(self, engine) -> bytes:
        """Refresh the gauges from the engine's state, then serialise everything."""
        self.queue_length.set(len(engine.batcher))
        for w in engine.executor.workers:
            labels = (str(w.index), w.device)
            self.worker_ready.labels(*labels).set(int(w.ready))
            self.worker_in_flight.labels(*labels).set(w.in_flight_images)
            self.worker_completed.labels(*labels).set(w.completed)
            self.worker_restarts.labels(*labels).set(w.restarts)
        return generate_latest(self.registry)
