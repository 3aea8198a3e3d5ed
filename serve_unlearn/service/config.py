"""``serve-unlearn serve --config FILE``: one YAML file, every section optional (``configs/serve.yaml``).

``registry`` + ``model`` serve forget requests (the control plane); ``eraser`` serves object removal; a config may
hold both. Each key is documented where it is declared.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from ..config import StrictConfig
from ..eval.policy import VerificationPolicy
from ..serving.vllm.contract import ADMIN_TOKEN_ENV
from .eraser.config import EraserConfig


class VllmSection(StrictConfig):
    """The vLLM servers forget requests are put in force on."""

    # start and supervise one `serve-unlearn vllm` server on `model` (stopped when the service stops)
    launch: bool = False
    # running `serve-unlearn vllm` servers (http://host:port) sharing this registry; with `launch`, the launched
    # server is added to them
    servers: list[str] = Field(default_factory=list)
    # the servers' VllmServeConfig YAML (gate, bank scales, guard refusal, port of a launched server)
    config: Path | None = None
    # extra `vllm serve` arguments of a launched server (e.g. --max-model-len 2048)
    args: list[str] = Field(default_factory=list)
    # environment variable holding the servers' vLLM API key, if they have one
    api_key_env: str = "VLLM_API_KEY"
    # how long a launched server may take to answer /health
    start_timeout_s: float = Field(900.0, gt=0)
    # how long a version switch waits for in-flight requests on the old version
    drain_timeout_s: float = Field(60.0, gt=0)


class WorkerSection(StrictConfig):
    """The training workers: separate processes, so the API stays responsive while a request trains."""

    # worker processes the service starts and restarts when they die (0: none here; run `serve-unlearn worker
    # --config FILE` on other hosts sharing a PostgreSQL registry)
    processes: int = Field(1, ge=0)
    # attempts per filing before it is `failed` (a worker killed mid-training costs one)
    max_attempts: int = Field(3, ge=1)
    # seconds without a heartbeat after which a filing's worker counts as dead (it beats every few seconds)
    lease_ttl_s: float = Field(60.0, ge=5)
    # how often an idle worker looks for a queued filing
    poll_s: float = Field(0.5, gt=0)
    # torch threads per worker (null: torch's default)
    torch_threads: int | None = Field(None, ge=1)


class ServeConfig(StrictConfig):
    # forget-request registry folder (created when missing); with `model`, the service takes forget requests
    registry: Path | None = None
    # HF folder of the base causal LM the requests are trained on (the model the vLLM servers serve)
    model: Path | None = None
    # PostgreSQL DSN shared by replicas (the registry folder then lives on a shared filesystem); null: SQLite
    registry_database: str | None = None
    # ForgetConfig YAML every filing starts from (configs/o3_forget.yaml); a filing's `config` overrides keys
    forget_config: Path | None = None
    # SalUnConfig / IAUConfig YAML every `method: salun` / `method: iau` filing starts from (null: the defaults)
    salun_config: Path | None = None
    iau_config: Path | None = None
    vllm: VllmSection = Field(default_factory=VllmSection)
    # what a filing's probes must show before it is put in force (filings without probes are not verified)
    evidence: VerificationPolicy = Field(default_factory=VerificationPolicy)
    worker: WorkerSection = Field(default_factory=WorkerSection)
    # the variable holding the deployment's admin token (the vLLM middleware reads the same one); unset or
    # empty: every admin route answers 401
    admin_token_env: str = ADMIN_TOKEN_ENV
    # a filing's body beyond this is answered 413
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # records per filing
    max_records: int = Field(10_000, ge=1)
    # how often the service puts ready filings in force and re-checks the servers
    publish_poll_s: float = Field(0.5, gt=0)
    # object removal (the eraser endpoint); null: not served
    eraser: EraserConfig | None = None

    @model_validator(mode="after")
    def _sections(self):
        if (self.registry is None) != (self.model is None):
            raise ValueError("`registry` and `model` go together: forget requests are trained on `model` and "
                             "recorded in `registry`")
        if self.registry is None and self.eraser is None:
            raise ValueError("nothing to serve: give `registry` and `model` (forget requests), `eraser` (object "
                             "removal), or both")
        if (self.vllm.launch or self.vllm.servers) and self.registry is None:
            raise ValueError("`vllm` needs `registry` and `model`: vLLM servers enforce forget requests")
        return self

    @property
    def forgets(self) -> bool:
        return self.registry is not None
