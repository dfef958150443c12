"""Local stand-ins for the production services: S3 (moto), an MLflow tracking server with its
artifacts in that S3 bucket, a Prefect server on SQLite, and optionally Prefect process workers
for the work pool's two queues (``pipelines`` for the flow runs of ``aot``, ``models`` for its
per-model child runs, limited to the model slots).

``aot services up`` starts what is not running yet, each on a loopback port, waits for its health
check, and records a pid file and a log under the state folder (``.services/`` by default);
``aot services down`` stops only the processes whose pid files it wrote. A service that already
answers on its port is reused (and left alone by ``down`` when ``up`` did not start it).

Settings (environment): ``AOT_SERVICES_DIR``, ``AOT_S3_PORT`` (5000), ``AOT_MLFLOW_PORT`` (5001),
``AOT_PREFECT_PORT`` (4200), ``AOT_WORKER_PORT`` (4201, the worker's health endpoint),
``AOT_S3_BUCKET`` (aot-diffusion: the DVC remote under ``dvc/``, MLflow artifacts under
``mlflow/``), ``AOT_WORK_POOL`` (aot-process), ``AOT_MODEL_SLOTS`` (models run at once: the
usable cores), ``AOT_GPUS`` (e.g. ``0,1``: one worker per GPU, each running one model with only its
GPU visible; its health port is ``AOT_WORKER_PORT`` + 1 + its index). moto's state lives in
memory: a restarted S3 server has empty buckets again. Real endpoints in ``AWS_ENDPOINT_URL``,
``MLFLOW_TRACKING_URI`` or ``PREFECT_API_URL`` replace the matching local service (not started).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
# The first MLflow start migrates its database: ~20 s on a loaded 2-core box.
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0
ENDPOINT_ENV = {
    "s3": "AWS_ENDPOINT_URL",
    "mlflow": "MLFLOW_TRACKING_URI",
    "prefect": "PREFECT_API_URL",
}
# Dummy credentials for the local S3 server only; real endpoints bring their own.
LOCAL_S3_KEYS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class Settings:
    """Where the local services live: state folder, ports, bucket and work pool."""

    state_dir: Path
    s3_port: int = 5000
    mlflow_port: int = 5001
    prefect_port: int = 4200
    worker_port: int = 4201
    bucket: str = "aot-diffusion"
    work_pool: str = "aot-process"
    model_slots: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    gpus: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ=os.environ) -> Settings:
        def number(name: str, default: int, most: float, what: str) -> int:
            value = environ.get(name, str(default))
            if not value.isdigit() or not 1 <= int(value) <= most:
                raise ValueError(f"{name} must be {what}, got {value!r}")
            return int(value)

        cores = len(os.sched_getaffinity(0))
        slots = number("AOT_MODEL_SLOTS", cores, float("inf"), "a whole number >= 1")
        ports = {  # defaults: the fields'
            key: number(f"AOT_{key.upper()}", getattr(cls, key), 65535, "a port number 1-65535")
            for key in ("s3_port", "mlflow_port", "prefect_port", "worker_port")
        }
        return cls(
            state_dir=Path(environ.get("AOT_SERVICES_DIR", ".services")).resolve(),
            bucket=environ.get("AOT_S3_BUCKET", cls.bucket),
            work_pool=environ.get("AOT_WORK_POOL", cls.work_pool),
            model_slots=slots,
            gpus=tuple(g for g in environ.get("AOT_GPUS", "").split(",") if g),
            **ports,
        )

    @property
    def s3_url(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    def local_url(self, name: str) -> str:
        """The URL a client uses for the local service ``name`` (s3, mlflow or prefect)."""
        return {"s3": self.s3_url, "mlflow": self.mlflow_url, "prefect": self.prefect_api_url}[name]

    def external(self, environ=os.environ) -> dict[str, str]:
        """Services the environment points at real endpoints (not these local ones): not started,
        and clients keep using the configured endpoint."""
        return {
            name: environ[var]
            for name, var in ENDPOINT_ENV.items()
            if environ.get(var) and environ[var].rstrip("/") != self.local_url(name)
        }

    def client_env(self, environ=os.environ) -> dict[str, str]:
        """What a client (CLI, flow run, test) needs to use these services; telemetry off.
        Endpoints configured in ``environ`` win over the local ones."""
        external = self.external(environ)
        env = {} if "s3" in external else dict(LOCAL_S3_KEYS)
        env |= {var: external.get(name, self.local_url(name)) for name, var in ENDPOINT_ENV.items()}
        return env | {
            "PREFECT_HOME": str(self.state_dir / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DVC_NO_ANALYTICS": "1",
        }


@dataclass(frozen=True)
class Service:
    name: str
    health_url: Callable[[Settings], str]
    command: Callable[[Settings], list[str]]
    env: Callable[[Settings], dict[str, str]] = lambda s: {}
    # The Prefect worker ignores SIGTERM (it forwards it and keeps polling); SIGINT stops it.
    stop_signal: int = signal.SIGTERM


def _bin(name: str) -> str:
    """A console script of this environment (next to the running interpreter)."""
    return str(Path(sys.executable).with_name(name))


def _loopback(port: int) -> list[str]:
    return ["--host", HOST, "--port", str(port)]


SERVICES = (
    Service(
        "s3",
        lambda s: f"{s.s3_url}/moto-api/",
        lambda s: [_bin("moto_server"), "-H", HOST, "-p", str(s.s3_port)],
    ),
    Service(
        "mlflow",
        lambda s: f"{s.mlflow_url}/health",
        lambda s: [
            _bin("mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{s.state_dir / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{s.bucket}/mlflow",
            *_loopback(s.mlflow_port),
            "--workers",
            "1",
        ],
        # The server alone talks to S3; its GenAI job runner (7 processes, ~2 GB) is not needed.
        lambda s: {
            "MLFLOW_S3_ENDPOINT_URL": s.s3_url,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        },
    ),
    Service(
        "prefect",
        lambda s: f"{s.prefect_api_url}/health",
        lambda s: [_bin("prefect"), "server", "start", *_loopback(s.prefect_port)],
    ),
)
# The work pool's queues (flows/aot_flow.py): the pipelines' parent runs, and the model runs
# whose concurrency limit places the models (Settings.model_slots; one per GPU with gpus).
PIPELINE_QUEUE, MODEL_QUEUE = "pipelines", "models"


def _worker(name: str, port: int, queues: tuple[str, ...], limit: int | None, env: dict) -> Service:
    """A Prefect process worker of the pool, polling ``queues``, at most ``limit`` runs at once."""
    command = [
        "worker", "start", "--pool", "{pool}", "--type", "process", "--with-healthcheck",
        *(arg for queue in queues for arg in ("--work-queue", queue)),
        *(("--limit", str(limit)) if limit else ()),
    ]  # fmt: skip
    return Service(
        name,
        lambda s: f"http://{HOST}:{port}/health",
        lambda s: [_bin("prefect"), *(a.format(pool=s.work_pool) for a in command)],
        lambda s: (
            env
            | {"PREFECT_WORKER_WEBSERVER_HOST": HOST, "PREFECT_WORKER_WEBSERVER_PORT": str(port)}
        ),
        signal.SIGINT,
    )


def workers(settings: Settings) -> tuple[Service, ...]:
    """One worker for every queue (the models queue limits what runs at once), or with
    ``gpus`` one worker for the pipelines and one per GPU, each running one model at a time
    with only its GPU visible."""
    queues = (PIPELINE_QUEUE,) if settings.gpus else ()  # without gpus: every queue
    per_gpu = tuple(
        _worker(f"worker-gpu{gpu}", settings.worker_port + 1 + i, (MODEL_QUEUE,), 1,
                {"CUDA_VISIBLE_DEVICES": gpu})
        for i, gpu in enumerate(settings.gpus)
    )  # fmt: skip
    return (_worker("worker", settings.worker_port, queues, None, {}), *per_gpu)


def all_services(settings: Settings) -> tuple[Service, ...]:
    return (*SERVICES, *workers(settings))


SERVICE_NAMES = (*(service.name for service in SERVICES), "worker")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.state_dir / f"{name}.pid"


def _running_pid(settings: Settings, name: str) -> int | None:
    """The pid recorded by ``up`` if that process still runs (a stale pid file is removed)."""
    path = _pid_file(settings, name)
    try:
        pid = int(path.read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError):
        return None
    except ProcessLookupError:
        path.unlink()
        return None
    return pid


def _launch(service: Service, settings: Settings, say: Callable[[str], None]):
    """Start ``service`` unless it answers already; the started process, or None."""
    url = service.health_url(settings)
    pid = _running_pid(settings, service.name)
    if healthy(url):
        owner = f"pid {pid}" if pid else "not started by `aot services`; left alone by `down`"
        say(f"{service.name}: already running at {url} ({owner})")
        return None
    if pid is not None:
        raise RuntimeError(
            f"{service.name}: pid {pid} from {_pid_file(settings, service.name)} runs but {url} "
            "does not answer; run `aot services down` first"
        )
    env = {**os.environ, **settings.client_env(), **service.env(settings)}
    with open(settings.state_dir / f"{service.name}.log", "ab") as out:
        # A session of its own: `down` signals the whole process group (servers fork children).
        proc = subprocess.Popen(
            service.command(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=settings.state_dir,
            start_new_session=True,
        )
    _pid_file(settings, service.name).write_text(f"{proc.pid}\n")
    return proc


def _start(chosen: Iterable[Service], settings: Settings, say: Callable[[str], None]) -> None:
    """Launch ``chosen`` side by side and wait for their health checks; if one never answers,
    stop every one launched here and raise."""
    started = time.monotonic()
    launched = [(s, proc) for s in chosen if (proc := _launch(s, settings, say)) is not None]
    try:
        for service, proc in launched:
            url, log = service.health_url(settings), settings.state_dir / f"{service.name}.log"
            while not healthy(url):
                if proc.poll() is not None or time.monotonic() - started > START_TIMEOUT_S:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                    raise RuntimeError(f"{service.name} did not start (log {log}):\n{tail}")
                time.sleep(0.3)
            elapsed = time.monotonic() - started
            say(f"{service.name}: started at {url} in {elapsed:.1f} s (pid {proc.pid})")
    except RuntimeError:
        for service, _ in launched:
            _stop(service, settings)
        raise


def ensure_queues(settings: Settings) -> None:
    """The process work pool with its two queues; the models queue limited to
    ``model_slots`` (or one run per GPU), set again on every ``up`` (idempotent)."""
    import httpx

    api, pool = settings.client_env()["PREFECT_API_URL"], settings.work_pool
    slots = len(settings.gpus) or settings.model_slots
    try:
        with httpx.Client(base_url=api, timeout=30) as client:
            response = client.post("/work_pools/", json={"name": pool, "type": "process"})
            if response.status_code != 409:  # 409: it exists already
                response.raise_for_status()
            for queue, limit in ((PIPELINE_QUEUE, None), (MODEL_QUEUE, slots)):
                body = {"name": queue, "concurrency_limit": limit}
                response = client.post(f"/work_pools/{pool}/queues", json=body)
                if response.status_code == 409:
                    response = client.patch(f"/work_pools/{pool}/queues/{queue}", json=body)
                response.raise_for_status()
    except httpx.HTTPError as error:
        raise RuntimeError(
            f"work pool {pool}: its queues could not be set at {api}: {error}"
        ) from None


def create_buckets(settings: Settings) -> None:
    """The bucket for MLflow artifacts and the DVC remote (idempotent)."""
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=settings.s3_url,
        aws_access_key_id=LOCAL_S3_KEYS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=LOCAL_S3_KEYS["AWS_SECRET_ACCESS_KEY"],
        region_name=LOCAL_S3_KEYS["AWS_DEFAULT_REGION"],
    )
    existing = {bucket["Name"] for bucket in s3.list_buckets().get("Buckets", [])}
    if settings.bucket not in existing:
        s3.create_bucket(Bucket=settings.bucket)


def up(
    settings: Settings,
    names: tuple[str, ...] = ("s3", "mlflow", "prefect"),
    say: Callable[[str], None] = print,
) -> None:
    """Start (or reuse) the named services in dependency order and wait until each is healthy."""
    unknown = set(names) - set(SERVICE_NAMES)
    if unknown:
        raise ValueError(f"services must be among {list(SERVICE_NAMES)}, got {sorted(unknown)}")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    for name, url in settings.external().items():
        if name in names:
            say(f"{name}: using the configured endpoint {url} (not started)")
    names = tuple(n for n in names if n not in settings.external())
    # The servers start side by side (MLflow needs S3 only when artifacts arrive); the worker
    # needs the Prefect server.
    _start([s for s in SERVICES if s.name in names], settings, say)
    if "s3" in names:
        create_buckets(settings)
    if "worker" in names:
        ensure_queues(settings)
        _start(workers(settings), settings, say)


def _alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child that exited: reap it
            return False
    except ChildProcessError:
        pass  # not our child (started by an earlier `aot services up`)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _stop(service: Service, settings: Settings) -> bool:
    """Stop the process group ``up`` started: its stop signal, again after half the timeout,
    then SIGKILL; stragglers of the group (e.g. a flow-run subprocess) get SIGTERM."""
    pid = _running_pid(settings, service.name)
    if pid is None:
        return False
    started = time.monotonic()
    _signal_group(pid, service.stop_signal)
    resent = False
    while _alive(pid):
        elapsed = time.monotonic() - started
        if elapsed > STOP_TIMEOUT_S:
            _signal_group(pid, signal.SIGKILL)
        elif elapsed > STOP_TIMEOUT_S / 2 and not resent:
            _signal_group(pid, service.stop_signal)
            resent = True
        time.sleep(0.2)
    _signal_group(pid, signal.SIGTERM)
    _pid_file(settings, service.name).unlink(missing_ok=True)
    return True


def down(settings: Settings, say: Callable[[str], None] = print) -> None:
    """Stop, workers first, every service whose pid file ``up`` wrote; nothing else."""
    started_workers = sorted(p.stem for p in settings.state_dir.glob("worker*.pid"))
    # A worker is stopped by name and signal alone, whatever gpus it was started with.
    stale = [_worker(name, 0, (), None, {}) for name in started_workers]
    for service in (*stale, *reversed(SERVICES)):
        if _stop(service, settings):
            say(f"{service.name}: stopped")


def status(settings: Settings) -> dict[str, dict]:
    """Per service: its health URL, whether it answers, and the pid ``up`` recorded (if running)."""
    return {
        service.name: {
            "url": service.health_url(settings),
            "healthy": healthy(service.health_url(settings)),
            "pid": _running_pid(settings, service.name),
        }
        for service in all_services(settings)
    }
