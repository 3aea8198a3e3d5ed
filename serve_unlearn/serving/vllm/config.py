"""Settings of O3 on vLLM (``configs/vllm.yaml``): the gate, the scaled bank, the middleware and the launcher."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ...adapters.gate import GateConfig
from ...config import StrictConfig
from .audit import AuditConfig
from .contract import ADMIN_TOKEN_ENV


class BankConfig(StrictConfig):
    """Scaled copies of the served adapter (vLLM has no per-request LoRA scale): the gate's scale is rounded to
    one of ``scales``; 0 is the base model."""

    scales: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0], min_length=1)
    rounding: Literal["nearest", "floor"] = "nearest"

    @model_validator(mode="after")
    def _positive(self):
        if any(not s > 0 for s in self.scales):
            raise ValueError(f"bank scales must be > 0 (0 is the base model); got {self.scales}")
        return self


class GuardConfig(StrictConfig):
    """Filings not yet in force (the control plane's ``guarded``/``ready``) refuse what their detectors flag."""

    enabled: bool = True
    # what a flagged prompt gets, as the assistant's answer in the route's own format
    refusal: str = Field("I can't help with that: it concerns information its owner asked this service to "
                         "forget.", min_length=1)


class VllmServeConfig(StrictConfig):
    gate: GateConfig = Field(default_factory=GateConfig)
    bank: BankConfig = Field(default_factory=BankConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    # the names clients use for the base model; default: what vLLM serves (--served-model-name, else the path)
    served_model_name: str | None = None
    # other model names non-admin clients may name (LoRAs the operator serves with --lora-modules); a name that
    # is neither these nor the served model gets 404 when the served names are known (the launcher passes them)
    allowed_models: list[str] = Field(default_factory=list)
    # the admin token's variable: adapter/engine management, the status page, naming an o3-* adapter and seeing
    # them in /v1/models need it; unset or empty: nobody is admin
    admin_token_env: str = ADMIN_TOKEN_ENV
    # a gated request's body beyond this is answered 413 before it is buffered further
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    # routes the gate does not know (a POST route of a newer vLLM or an endpoint plugin) are refused (403) unless
    # named here (their templates, e.g. /v1/my_route), open to everyone or to admins only
    open_routes: list[str] = Field(default_factory=list)
    admin_routes: list[str] = Field(default_factory=list)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    poll_interval_s: float = Field(1.0, ge=0)          # how often the middleware checks for a new version
    # torch threads of the detectors in each API-server process: 1 keeps them from spinning on the cores the
    # engine's threads need (null: torch's default, every core)
    gate_threads: int | None = Field(1, ge=1)
    # a PostgreSQL DSN shared by replicas (artifacts stay in the registry folder, on a shared filesystem);
    # None: SQLite inside the registry folder, or $SERVE_UNLEARN_REGISTRY_DATABASE
    registry_database: str | None = None
    # launcher
    patches: list[str] = Field(default_factory=list)    # SalUn/IAU weight patches, through --load-format
    max_loras: int | None = Field(None, ge=1)           # default: two bank versions + one free slot
    # room for later requests without a restart: per-request mode serves rank r·T (64 = 8 requests at r=8)
    max_lora_rank: int = Field(64, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    extra_args: list[str] = Field(default_factory=list)  # passed to `vllm serve` as they are
    env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _gate_stays_on(self):
        from .routes import ADMIN_ROUTES, GATED_ROUTES

        opened = sorted(set(self.open_routes) & (GATED_ROUTES | ADMIN_ROUTES))
        if opened:
            raise ValueError(f"open_routes would take {opened} out of the gate or the admin check (they are "
                             "gated or admin-only routes); remove them from open_routes")
        return self

    @classmethod
    def load(cls, path: str | Path | None) -> VllmServeConfig:
        return cls.from_yaml(path) if path else cls()
