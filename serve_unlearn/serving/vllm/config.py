"""Settings of O3 on vLLM (``configs/vllm.yaml``): the gate, the scaled bank, the middleware and the launcher."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ...adapters.gate import GateConfig
from ...config import StrictConfig as _Strict

CONFIG_ENV = "SERVE_UNLEARN_CONFIG"
REGISTRY_ENV = "SERVE_UNLEARN_REGISTRY"


class BankConfig(_Strict):
    """Scaled copies of the served adapter (vLLM has no per-request LoRA scale): the gate's scale is rounded to
    one of ``scales``; 0 is the base model."""

    scales: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0], min_length=1)
    rounding: Literal["nearest", "floor"] = "nearest"

    @model_validator(mode="after")
    def _positive(self):
        if any(not s > 0 for s in self.scales):
            raise ValueError(f"bank scales must be > 0 (0 is the base model); got {self.scales}")
        return self


class VllmServeConfig(_Strict):
    gate: GateConfig = Field(default_factory=GateConfig)
    bank: BankConfig = Field(default_factory=BankConfig)
    # the names clients use for the base model; default: what vLLM serves (--served-model-name, else the path)
    served_model_name: str | None = None
    admin_token_env: str = "SERVE_UNLEARN_ADMIN_TOKEN"  # clients naming an o3-* adapter must send this token
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

    @classmethod
    def load(cls, path: str | Path | None) -> VllmServeConfig:
        return cls.from_yaml(path) if path else cls()
