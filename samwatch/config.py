"""The daemon's configuration: one pydantic model, the single source of the schema.

Relative paths in a config file are resolved against the folder of that file (so a unit
file and a person in a shell mean the same folders); with no config file they are relative
to the working directory, which gives the contract's ./inbox, ./outbox and ./.samwatch.
Reading a config file into this model is ``samwatch.config_file``'s.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from samwatch.families import ModelType

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_URL_SCHEMES = ("http://", "https://", "hf://", "file://")


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class WatchSettings(StrictModel):
    mode: Literal["auto", "native", "polling"] = Field(
        "auto",
        description="auto: native events on local disks, polling on network/FUSE mounts; "
        "native: inotify & co plus periodic rescans; polling: scans only.",
    )
    poll_interval_seconds: float = Field(2.0, gt=0, description="Seconds between polling passes.")
    settle_seconds: float = Field(
        2.0, ge=0, description="A file is read only after size and mtime stood still this long."
    )
    rescan_interval_seconds: float = Field(
        60.0, gt=0, description="In native mode, a full rescan this often catches missed events."
    )


class DefaultSettings(StrictModel):
    model: ModelType = "vit_t"
    weights: str = "default"
    label: str = Field("object", description="Classification of features when the sidecar sets none.")
    priority: int = Field(0, description="Higher runs first; sidecars and folder defaults may override.")


class LimitSettings(StrictModel):
    max_image_pixels: int = Field(
        178_956_970, gt=0,
        description="Pixels decoded at once: a whole frame, or one region/tile of a slide; larger images are refused.",
    )
    max_slide_pixels: int = Field(
        25_000_000_000, gt=0,
        description="Level-0 pixels of a tiled/pyramidal slide (read by region); larger slides are refused.",
    )
    max_sidecar_bytes: int = Field(1_048_576, gt=0)
    max_image_bytes: int = Field(8 * 1024**3, gt=0, description="Larger input files are refused unread.")
    max_video_bytes: int = Field(
        4 * 1024**3, gt=0, description="RGB bytes of a whole sequence a video job may hold."
    )
    max_job_memory: int | None = Field(
        768 * 1024**2, gt=0,
        description="Bytes a job plans to hold beyond the loaded model (prompt and point batches, "
        "their masks): batches shrink to fit; a job that cannot fit one prompt at a time is refused "
        "(job_memory_exceeded). The process's peak adds the image and the encoder's outputs "
        "(~250 MiB at 1024²), so the default keeps a job within 1 GiB. null: no limit.",
    )
    max_annotation_bytes: int = Field(
        256 * 1024**2, gt=0, description="A QuPath GeoJSON export larger than this is refused unread."
    )
    max_annotations: int = Field(
        100_000, gt=0, description="Features in one QuPath GeoJSON export, of any type; more are refused."
    )


class InputSettings(StrictModel):
    after: Literal["keep", "move"] = Field(
        "keep", description="move: inputs go to inbox/_done/ or inbox/_failed/ after their job."
    )
    image_roots: list[Path] = Field(
        default_factory=list,
        description="Read-only folders (a slide store) whose images a sidecar may name by absolute path; "
        "samwatch never writes, moves or watches anything there.",
    )


AccelStep = Literal["onnxruntime", "sdpa", "bf16", "fp16", "compile"]


class AccelerateSettings(StrictModel):
    """How the image encoder (and on CPU the mask decoder) runs on each kind of device; an empty
    list is eager fp32 PyTorch.

    Defaults by measurement (bench/bench_speed.py): on 2 CPU cores ONNX Runtime encodes vit_t
    in about a third of eager PyTorch's time, while ``torch.compile`` took ~50 s to compile and
    gained nothing steady. ``onnxruntime`` also runs the mask decoder, each prompt's cost once
    the image is encoded (vit_t, sam2_t: a box predicts in ~0.7x of eager's 36 ms). On CUDA,
    SDPA attention with bf16 autocast as segment-anything-fast does; ``compile``
    (max-autotune) is opt-in as it adds minutes to the first job of a model. GPU steps apply
    to the image encoder only; the decoder stays eager fp32 there.
    """

    cpu: tuple[AccelStep, ...] = Field(
        ("onnxruntime",),
        description="On CPU: [onnxruntime] (image encoder and mask decoder) or PyTorch steps.",
    )
    cuda: tuple[AccelStep, ...] = Field(
        ("sdpa", "bf16"), description="On CUDA GPUs: any of sdpa, bf16 or fp16, compile."
    )
    mps: tuple[AccelStep, ...] = Field(("sdpa",), description="On Apple GPUs: any of sdpa, bf16 or fp16, compile.")

    @field_validator("cpu", "cuda", "mps")
    @classmethod
    def _check_steps(cls, steps: tuple[str, ...], info: Any) -> tuple[str, ...]:
        if "onnxruntime" in steps and (info.field_name != "cpu" or len(steps) > 1):
            raise ValueError("onnxruntime runs the whole encoder on the CPU: give it alone, under cpu")
        if "bf16" in steps and "fp16" in steps:
            raise ValueError("choose one of bf16 and fp16")
        return tuple(dict.fromkeys(steps))

    def steps_for(self, device_type: str) -> tuple[str, ...]:
        return getattr(self, device_type, ())


class ModelSettings(StrictModel):
    max_loaded: int = Field(2, ge=1, description="Models kept loaded between jobs (least recently used evicted).")
    memory_budget_mb: int | None = Field(
        None, gt=0, description="Evict loaded models beyond this many MB of parameters; none: max_loaded only."
    )
    embedding_cache: int = Field(4, ge=0, description="Image embeddings kept per model for re-runs.")
    tile_embedding_cache_mb: int = Field(
        2048, ge=0,
        description="Disk space in state_dir for embeddings of tiles and prompt windows of large images "
        "(least recently used evicted); 0: none kept.",
    )
    prompt_batch_size: int | None = Field(
        None, ge=1, description="Prompts decoded per batch; none: chosen per model and device (1 on CPU)."
    )
    accelerate: AccelerateSettings = Field(
        default_factory=AccelerateSettings, description="Image encoder (and CPU mask decoder) fast paths per device type."
    )


class ServiceSettings(StrictModel):
    instance: str = Field(default_factory=socket.gethostname, description="This daemon's name in claims and status.")
    heartbeat_seconds: float = Field(5.0, gt=0)
    job_stall_seconds: float = Field(
        1800.0, gt=0, description="A job without progress this long stops the systemd watchdog pings."
    )
    claim_ttl_seconds: float = Field(
        120.0, gt=0, description="A claim not refreshed this long is taken over by another daemon."
    )
    recent_failures: int = Field(20, ge=0)
    retry_base_seconds: float = Field(
        30.0, gt=0, description="A transient failure (download, I/O) runs again after this, doubled per attempt."
    )
    retry_attempts: int = Field(5, ge=0, description="Automatic retries of one job version after transient failures.")


OutputFormat = Literal["geojson", "labels"]


class OutputSettings(StrictModel):
    """What every result includes unless its sidecar's ``output:`` block says otherwise."""

    formats: list[OutputFormat] = Field(
        default_factory=lambda: ["geojson"],
        description="geojson is always written; labels adds NAME.labels.tif (OME-TIFF instance labels) and NAME.labels.csv.",
    )
    object_type: Literal["annotation", "detection"] = Field(
        "annotation", description="QuPath object type of the results (a sidecar's output.object_type overrides it)."
    )
    preview: bool = Field(True, description="Write NAME.preview.png: the image with every feature drawn.")
    preview_size: int = Field(1024, ge=64, le=8192, description="Longest side of the preview, in pixels.")


class WeightsEntry(StrictModel):
    name: str
    type: ModelType
    url: str | None = None
    path: Path | None = None
    sha256: str | None = None
    config: str | None = Field(
        None, description="SAM2 only: the Hydra config, e.g. configs/sam2.1/sam2.1_hiera_t.yaml."
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @field_validator("sha256")
    @classmethod
    def _check_sha256(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256_RE.match(value.lower()):
            raise ValueError("must be 64 hexadecimal digits")
        return value.lower() if value else value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(_URL_SCHEMES):
            raise ValueError(f"must start with one of {', '.join(_URL_SCHEMES)}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> WeightsEntry:
        if (self.url is None) == (self.path is None):
            raise ValueError("give exactly one of url or path")
        return self

    @property
    def source(self) -> str:
        return self.url if self.url is not None else str(self.path)


class ClusterSettings(StrictModel):
    """A dask-jobqueue cluster the daemon starts itself (needs dask-jobqueue and the batch system)."""

    kind: Literal["slurm", "pbs", "sge", "lsf"] = "slurm"
    queue: str | None = Field(None, description="Partition / queue the worker jobs go to.")
    cores: int = Field(4, ge=1, description="Cores per worker job.")
    memory: str = Field("16GB", description="Memory per worker job, e.g. 32GB.")
    gpus: int = Field(0, ge=0, description="GPUs per worker job (Slurm: --gres=gpu:N).")
    walltime: str | None = Field(None, description="Per worker job, e.g. 08:00:00.")
    extra_directives: list[str] = Field(default_factory=list, description="More #SBATCH/#PBS lines.")
    adapt_minimum: int = Field(0, ge=0, description="Worker jobs kept when idle.")
    adapt_maximum: int = Field(4, ge=1, description="Worker jobs at most.")
    python: str | None = Field(
        None, description="The workers' Python, as the compute nodes see it (e.g. /opt/samwatch/.venv/bin/python); "
        "default: the daemon's own interpreter path.",
    )
    venv: str | None = Field(None, description="Instead of python: the workers' virtualenv (its bin/python, activated).")
    env: dict[str, str] = Field(
        default_factory=dict, description="Variables each worker job exports before its worker starts (PYTHONPATH, HF_HOME...).",
    )
    prologue: list[str] = Field(
        default_factory=list, description="Shell lines each worker job runs first (module load cuda, source ...).",
    )

    @model_validator(mode="after")
    def _one_python(self) -> ClusterSettings:
        if self.python is not None and self.venv is not None:
            raise ValueError("give python or venv, not both")
        bad = [name for name in self.env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)]
        if bad:
            raise ValueError(f"env: not a variable name: {', '.join(bad)}")
        return self

    @property
    def worker_python(self) -> str | None:
        """The interpreter the worker jobs run (None: the daemon's own)."""
        return f"{self.venv.rstrip('/')}/bin/python" if self.venv is not None else self.python


class ExecutorSettings(StrictModel):
    kind: Literal["local", "dask"] = Field("local", description="local: threads here, one per device; dask: a Dask cluster.")
    address: str | None = Field(None, description="dask: an existing scheduler, e.g. tcp://host:8786.")
    cluster: ClusterSettings | None = Field(None, description="dask: start a dask-jobqueue cluster instead.")
    pipeline_depth: int = Field(
        3, ge=1, le=8,
        description="local: jobs each slot holds at once, so that one is on the device while the next is read "
        "and the last is traced and written; 1 runs them strictly one after another.",
    )
    device: str = Field("auto", description="dask: the device each worker uses (auto: its GPU, else cpu).")
    path_map: dict[str, str] = Field(
        default_factory=dict,
        description="dask: prefixes rewritten for workers that mount the share elsewhere "
        "({'/srv/samwatch': '/mnt/samwatch'}): inbox, state_dir, weights paths and images under inputs.image_roots.",
    )

    @model_validator(mode="after")
    def _one_cluster(self) -> ExecutorSettings:
        if self.kind == "dask" and (self.address is None) == (self.cluster is None):
            raise ValueError("executor kind dask needs exactly one of address or cluster")
        return self


class Config(StrictModel):
    inbox: Path = Path("inbox")
    outbox: Path = Path("outbox")
    state_dir: Path = Path(".samwatch")
    device: str | list[str] = Field(
        "auto",
        description="auto (every visible GPU, else mps, else cpu), cuda, cuda:N, mps or cpu; or a list, "
        "one job slot per entry ([cuda:0, cuda:1]; [cpu, cpu] runs two CPU jobs at once).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    watch: WatchSettings = WatchSettings()
    defaults: DefaultSettings = DefaultSettings()
    limits: LimitSettings = LimitSettings()
    inputs: InputSettings = InputSettings()
    models: ModelSettings = ModelSettings()
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    executor: ExecutorSettings = Field(
        ExecutorSettings(), description="Where jobs run: local (default) or a Dask cluster (samwatch[dask])."
    )

    @field_validator("executor", mode="before")
    @classmethod
    def _executor_shorthand(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    output: OutputSettings = OutputSettings()
    weights: list[WeightsEntry] = Field(
        default_factory=list, description="Registry entries; each type also has a built-in 'default'."
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str | list[str]) -> str | list[str]:
        items = value if isinstance(value, list) else [value]
        if not items:
            raise ValueError("a device list needs at least one entry")
        for item in items:
            if not _DEVICE_RE.match(item) or (isinstance(value, list) and item == "auto"):
                raise ValueError(f"{item!r}: must be auto, cpu, mps, cuda or cuda:N (a list names devices, not auto)")
        return value

    @field_validator("weights")
    @classmethod
    def _unique_names(cls, entries: list[WeightsEntry]) -> list[WeightsEntry]:
        seen: set[tuple[str, str]] = set()
        for entry in entries:
            key = (entry.type, entry.name)
            if key in seen:
                raise ValueError(f"two entries named {entry.name!r} for type {entry.type}")
            seen.add(key)
        return entries

    def resolved(self, base: Path) -> Config:
        """The same config with every relative path anchored at ``base``."""

        def anchor(path: Path) -> Path:
            return path if path.is_absolute() else (base / path).resolve()

        weights = [
            entry.model_copy(update={"path": anchor(entry.path)}) if entry.path else entry
            for entry in self.weights
        ]
        return self.model_copy(
            update={
                "inputs": self.inputs.model_copy(update={"image_roots": [anchor(p) for p in self.inputs.image_roots]}),
                "inbox": anchor(self.inbox),
                "outbox": anchor(self.outbox),
                "state_dir": anchor(self.state_dir),
                "weights": weights,
            }
        )


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """Keys that a running daemon cannot apply without a restart."""
    return [key for key in ("inbox", "outbox", "state_dir", "device", "executor") if getattr(old, key) != getattr(new, key)]
