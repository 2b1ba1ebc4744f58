"""ServerConfig: every knob of `qitrt serve`, one documented field each. The CLI flags are generated from it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.shapes import parse_size

API_KEY_ENV = "QITRT_API_KEY"
ROLES = ("all", "encoder", "denoiser")
DEFAULT_MAX_BATCH = 8  # images per batch when neither the flag nor the engine profile says otherwise
DEFAULT_MAX_QUEUE_DELAY_MS = 5.0  # when neither --max-queue-delay-ms nor a --batching-profile says otherwise


def doc(default, help: str, **kw):
    """A dataclass field whose help text is its documentation (and its --flag's help)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ServerConfig:
    checkpoint: str = doc(None, "Qwen-Image checkpoint folder (diffusers layout)", positional=True)
    engines: str | None = doc(None, "engine folder from `qitrt export`/`qitrt build` (its limits narrow requests)")
    backend: str | None = doc(None, "torch | onnxruntime | tensorrt (default: onnxruntime with --engines, else torch)")
    devices: str = doc("cpu", "comma-separated devices, one worker process each, e.g. cuda:0,cuda:1 or cpu,cpu")
    host: str = doc("127.0.0.1", "address to bind; loopback unless you mean to expose the server")
    port: int = doc(8000, "TCP port")
    api_key: str | None = doc(None, f"key required as 'Authorization: Bearer KEY' or 'X-API-Key' on every endpoint "
                              f"but /health (default: ${API_KEY_ENV}, else none)")
    max_batch_size: int | None = doc(None, "most images in one pipeline call (default: "
                                     f"{DEFAULT_MAX_BATCH}, capped by the engine profile's batch); 1 turns batching off")
    max_queue_delay_ms: float | None = doc(None, "longest the oldest queued request waits for a batch to fill, ms "
                                           f"(default: the batching profile's, else {DEFAULT_MAX_QUEUE_DELAY_MS:g})")
    batching_profile: str | None = doc(None, "JSON file from `qitrt bench batching` for these engines, checkpoint, "
                                       "backend and device kind (refused otherwise): per size its max batch, and the "
                                       "queue delay; --max-batch-size / --max-queue-delay-ms, when given, win")
    max_queue_size: int = doc(64, "requests waiting (not running) beyond which new ones get 429 + Retry-After")
    priority_levels: int = doc(3, "priority values 0 (most urgent) .. N-1; the default is the middle one")
    default_timeout_s: float = doc(120.0, "per-request timeout when the request names none (504 when passed)")
    max_timeout_s: float = doc(600.0, "largest timeout a request may ask for")
    max_prompt_chars: int = doc(4000, "longest prompt or negative prompt, in characters")
    max_n: int = doc(8, "most images per request (also capped by the batch size)")
    max_steps: int = doc(100, "most denoising steps per request")
    default_size: str = doc("1024x1024", "image size when the request names none")
    default_steps: int | None = doc(None, "denoising steps when the request names none (default: the steps of the "
                                    "recipe the engines were made for, e.g. 8 for lightning-8step, else 20)")
    max_body_bytes: int = doc(1 << 20, "largest request body without images (413 beyond)")
    max_image_body_bytes: int = doc(64 << 20, "largest body of an edit request or a job with images (413 beyond)")
    max_image_bytes: int = doc(20 << 20, "largest input image file (400 beyond)")
    max_image_pixels: int = doc(4096 * 4096, "most pixels (width x height) of an input image, read from its header "
                                "before decoding (400 beyond: decompression bombs stop there)")
    max_retries: int = doc(1, "times a request whose worker died is re-queued before it fails")
    shutdown_grace_s: float = doc(30.0, "on SIGTERM/SIGINT, how long in-flight requests may take to finish")
    threads_per_worker: int | None = doc(None, "torch and ONNX Runtime CPU threads per worker (default: cores / "
                                         "CPU workers)")
    dtype: str = doc("auto", "weights dtype of the torch modules in each worker: auto (bf16 on CUDA, the model's "
                     "reference precision; fp32 on CPU) | bf16 | fp16 | fp32")
    job_ttl_s: float = doc(600.0, "how long a finished async job's result is kept")
    jobs_dir: str | None = doc(None, "folder of the durable job store (SQLite + result PNGs); jobs survive a restart "
                               "(default: $XDG_STATE_HOME or ~/.local/state, then qitrt/jobs-PORT)")
    jobs_max_bytes: int = doc(1 << 30, "bytes of finished job results kept; the oldest are evicted first")
    min_timeout_s: float = doc(1.0, "smallest timeout a request may ask for")
    heartbeat_interval_s: float = doc(1.0, "how often each worker says it is alive")
    heartbeat_timeout_s: float = doc(10.0, "a worker silent this long (stopped, hung) is killed and restarted, its "
                                     "batch re-queued")
    stall_factor: float = doc(20.0, "a batch with no denoising step for this many times the measured step time is "
                              "wedged: its worker is killed and restarted, the batch re-queued")
    stall_min_s: float = doc(60.0, "never count a batch as wedged before this many seconds without a step")
    stall_first_s: float = doc(600.0, "the same limit before any step time was measured (warm-up, compilation)")
    max_connections: int = doc(1024, "open client connections; beyond, new ones get 503 and are closed")
    header_timeout_s: float = doc(10.0, "a connection that has not sent a request's complete headers in this time "
                                  "is closed (idle and half-sent requests)")
    body_timeout_s: float = doc(30.0, "longest a request body may take to arrive (408 beyond)")
    keep_alive_s: float = doc(5.0, "an idle keep-alive connection is closed after this")
    allowed_hosts: str | None = doc(None, "comma-separated Host header values accepted (DNS-rebinding guard); "
                                    "default: localhost names on a loopback bind, any on others; * for any")
    cors_origins: str | None = doc(None, "comma-separated origins allowed by CORS (default: none, CORS off)")
    drain_retry_after_s: int = doc(5, "Retry-After sent with 503 while the server drains")
    ui: bool = doc(False, "mount the web UI (Gradio) at /ui, served by the same workers; with an API key, open "
                   "/ui?key=KEY once (pip install 'qwen-image-trt[ui]')")
    trt_weight_streaming_budget: str | None = doc(None, "TensorRT engines built with --weight-streaming: weights "
                                                  "kept on each GPU, in bytes, a fraction (0.5) or auto")
    trt_cuda_graphs: bool = doc(False, "TensorRT: one CUDA graph per input shape, replayed")
    lora_dir: str | None = doc(None, "folder of LoRA adapters served by name: NAME.safetensors (diffusers/PEFT, "
                               "kohya or Lightning format); a request picks them with `lora`")
    max_loras: int = doc(4, "most adapters one request may combine")
    lora_cache_bytes: int = doc(4 << 30, "bytes of adapter files each worker keeps loaded; the least recently used "
                                "adapter is unloaded first")
    step_cache: float | None = doc(None, "step-cache threshold for requests that name none (runtime.step_cache: "
                                   "skip transformer calls while the input barely changed; 0.1-0.3 typical; "
                                   "default: off, every step runs)")
    role: str = doc("all", "all: one process tree (text encoder, transformer and VAE in each worker) | encoder: the "
                    "text encoder as a service for denoisers (POST /v1/encode) | denoiser: transformer and VAE, "
                    "prompts encoded by --encoder-url (docs/serving.md, 'Split roles')")
    encoder_url: str | None = doc(None, "--role denoiser: the encoder service's URL, e.g. http://10.0.0.5:8001 (its "
                                  "text encoder must be this checkpoint's; the server's --api-key is sent to it)")
    ray: bool = doc(False, "deploy on Ray Serve instead of this process tree: an encoder deployment, denoiser "
                    "replicas (one per GPU), an ingress with this API (pip install 'qwen-image-trt[ray]')")
    ray_address: str | None = doc(None, "--ray: the cluster to join, e.g. ray://head:10001 or auto (default: a local "
                                  "one)")
    ray_replicas: str = doc("1", "--ray: denoiser replicas, a number or auto (Ray's autoscaler, 1 to the devices "
                            "listed, 2 ongoing requests per replica)")
    ray_cpus_per_replica: float = doc(1.0, "--ray on CPUs: cores each encoder/denoiser replica reserves")
    embedding_cache_bytes: int = doc(256 << 20, "bytes of prompt embeddings each worker keeps (LRU; the empty "
                                     "negative prompts are pinned): a repeated prompt skips the text encoder; 0: off")
    torch_fast: str | None = doc(None, "backend torch's fast path in each worker: compile, fp8, cuda_graphs, comma-"
                                 "separated (runtime.torch_fast; checked against every device at start)")

    def __post_init__(self):
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        from qwen_image_trt.runtime.limits import check_threshold

        self.step_cache = check_threshold(self.step_cache)
        for name in ("max_queue_size", "priority_levels", "max_n", "max_steps", "max_prompt_chars", "max_body_bytes",
                     "max_image_body_bytes", "max_image_bytes", "max_image_pixels",
                     "max_connections", "jobs_max_bytes", "max_loras", "lora_cache_bytes"):
            if getattr(self, name) < 1:
                raise InputError(name, getattr(self, name), "an integer >= 1")
        if self.role not in ROLES:
            raise InputError("role", self.role, f"one of {', '.join(ROLES)}")
        if (self.role == "denoiser") != bool(self.encoder_url):
            raise InputError("encoder_url", self.encoder_url, "an http(s):// URL with --role denoiser, and only then")
        if self.encoder_url and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.encoder_url):
            raise InputError("encoder_url", self.encoder_url, "an http(s):// URL, e.g. http://10.0.0.5:8001")
        if self.ray_replicas != "auto" and not (self.ray_replicas.isdigit() and int(self.ray_replicas) >= 1):
            raise InputError("ray_replicas", self.ray_replicas, "an integer >= 1 or auto")
        if self.ray_cpus_per_replica <= 0:
            raise InputError("ray_cpus_per_replica", self.ray_cpus_per_replica, "a number > 0")
        if self.ray and self.role != "all":
            raise InputError("role", self.role, "all with --ray (the Ray application deploys both roles itself)")
        if self.embedding_cache_bytes < 0:
            raise InputError("embedding_cache_bytes", self.embedding_cache_bytes, "an integer >= 0 (0: off)")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise InputError("max_batch_size", self.max_batch_size, "an integer >= 1")
        if (self.max_queue_delay_ms is not None and self.max_queue_delay_ms < 0) or self.max_retries < 0:
            raise InputError("max_queue_delay_ms/max_retries", (self.max_queue_delay_ms, self.max_retries), ">= 0")
        for name in ("heartbeat_interval_s", "heartbeat_timeout_s", "stall_factor", "stall_min_s", "stall_first_s",
                     "header_timeout_s", "body_timeout_s", "keep_alive_s", "min_timeout_s"):
            if not getattr(self, name) > 0:
                raise InputError(name, getattr(self, name), "a number > 0")
        if self.heartbeat_timeout_s <= 2 * self.heartbeat_interval_s:
            raise InputError("heartbeat_timeout_s", self.heartbeat_timeout_s,
                             f"more than twice heartbeat_interval_s ({self.heartbeat_interval_s:g} s)")
        if self.lora_dir is not None and not Path(self.lora_dir).is_dir():
            raise InputError("lora_dir", self.lora_dir, "an existing folder of NAME.safetensors LoRA files")
        if self.min_timeout_s > self.max_timeout_s:
            raise InputError("min_timeout_s", self.min_timeout_s, f"at most max_timeout_s ({self.max_timeout_s:g})")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise InputError("dtype", self.dtype, "one of auto, bf16, fp16, fp32")
        self.device_list()
        parse_size(self.default_size, "default_size")
        self.trt_options()  # checks the budget's form before any worker starts
        self.torch_options()
        # not a field: the profile's limits for the served backend, checked against what is served (None without one)
        from qwen_image_trt.serve.batching_profile import load_batching_profile

        self.batching_limits = load_batching_profile(self) if self.batching_profile else None

    @property
    def queue_delay_ms(self) -> float:
        """The batcher's delay: the flag when given, else the batching profile's, else the default."""
        if self.max_queue_delay_ms is not None:
            return self.max_queue_delay_ms
        if self.batching_limits is not None:
            return self.batching_limits.max_queue_delay_ms
        return DEFAULT_MAX_QUEUE_DELAY_MS

    @property
    def steps_default(self) -> int:
        """default_steps, or 20 where neither it nor an engine recipe (create_app fills that in) says."""
        return 20 if self.default_steps is None else self.default_steps

    def torch_options(self):
        """The torch fast path, refused at start where a device (or the backend) cannot run it."""
        from qwen_image_trt.runtime.torch_fast import TorchOptions, check_torch_options

        options = TorchOptions.parse(self.torch_fast)
        if options.any and self.backend not in (None, "torch"):
            raise InputError("torch_fast", self.torch_fast, f"backend torch only (the server runs {self.backend})")
        if options.any and self.engines:
            raise InputError("torch_fast", self.torch_fast, "backend torch only (the server runs engines)")
        for device in self.device_list():
            check_torch_options(options, device)
        return options

    def trt_options(self) -> dict:
        from qwen_image_trt.runtime.backends import trt_options

        return trt_options(self.trt_weight_streaming_budget, self.trt_cuda_graphs)

    @property
    def resolved_jobs_dir(self) -> str:
        if self.jobs_dir:
            return self.jobs_dir
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        return os.path.join(state, "qitrt", f"jobs-{self.port}")

    @property
    def loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")

    def host_allowlist(self) -> list[str] | None:
        """Host header names accepted (lower case, no port); None accepts any."""
        if self.allowed_hosts:
            names = [h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip()]
            return None if "*" in names else names
        return sorted({"127.0.0.1", "localhost", "[::1]", "::1", self.host.lower()}) if self.loopback else None

    @property
    def resolved_backend(self) -> str:
        return self.backend or ("onnxruntime" if self.engines else "torch")

    def device_list(self) -> list[str]:
        devs = [d.strip() for d in self.devices.split(",") if d.strip()]
        if not devs or any(not re.fullmatch(r"cpu|cuda(:\d+)?", d) for d in devs):
            raise InputError("devices", self.devices, "a comma-separated list of cpu or cuda:N, e.g. cuda:0,cuda:1")
        return devs

    def cpu_threads(self) -> int | None:
        """torch threads for each CPU worker: several workers each with all cores would oversubscribe the CPU
        (N workers x N threads fight for N cores and all get slower), so they share the cores instead."""
        n_cpu = sum(d == "cpu" for d in self.device_list())
        if self.threads_per_worker:
            return self.threads_per_worker
        return max(1, (os.cpu_count() or 1) // n_cpu) if n_cpu > 1 else None

    @classmethod
    def field_help(cls) -> dict:
        return {f.name: f.metadata for f in fields(cls)}
