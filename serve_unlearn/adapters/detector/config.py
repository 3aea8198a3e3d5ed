"""The detector's hyperparameters and its background of ordinary prompts."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ...config import StrictConfig
from ...errors import UnlearnConfigError

MIN_CALIBRATION = 4  # held-out texts: mu2 and sigma2 need a few points
MIN_FIT = 8          # fitted texts: the cross-fitted Gaussians and the SVM need a few points per fold
BACKGROUND_FILE = "background_prompts.txt"  # packaged next to this module
BACKGROUND_MIN = 16  # ordinary prompts: fewer say little about what ordinary traffic looks like


class DetectorConfig(StrictConfig):
    """Detector hyperparameters; defaults are for MiniLM (6 layers, 384-d) on CPU and a few dozen forget texts."""

    backbone: str | None = Field(None, description="HF encoder folder or name; None = the packaged MiniLM")
    # O3's LoRA (r 8, alpha 32, dropout 0.1 on query/key/value)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "key", "value"], min_length=1)
    # LoRA on the top k layers only, so an ensemble runs the layers below once for all requests; None = every
    # layer (O3), 0 = no LoRA (the glocal score of the frozen backbone: one shared pass for every request). 0 on
    # MiniLM: the same AUROC and routing as a LoRA, while five requests cost barely more than one (README;
    # benchmarks/o3_gate_latency.py, o3_gate_routing.py)
    lora_layers: int | None = Field(0, ge=0)
    # training: O3's TOFU lr (1e-4; its ScienceQA 1e-5 moves a LoRA too little in the few steps a small request
    # gives), batch 8, warm-up 6%, weight decay 0.01; 3 epochs because a request has tens of texts, not thousands
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(8, ge=2, description="the CEL contrasts the texts of one batch, so >= 2")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    max_length: int = Field(128, ge=8, description="tokens per text; prompts are questions, not documents")
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    # scoring: see `gamma` below; nu as O3's ScienceQA detector
    gamma: float = Field(
        4000.0, ge=0,
        description="weight of the nearest-neighbour cosine against the Gaussian log-density: between the "
                    "forget topic and other text, MiniLM's log-density moves some thousands of times as much as "
                    "the cosine (figures in the README), so 4000 gives both terms about the same pull")
    nu: float = Field(0.1, gt=0, le=1, description="one-class SVM: the fraction of forget texts allowed outside")
    background: str | None = Field(
        "builtin",
        description="ordinary prompts the local term is taken relative to (glocal): 'builtin' = the packaged "
                    f"{BACKGROUND_FILE} ({BACKGROUND_MIN}+ lines), a path to a text file with one prompt a line, "
                    "or None for O3's purely one-class score")
    cv_folds: int = Field(5, ge=2, description="folds for the out-of-fold scores the SVM and mu1 are fitted on")
    calibration_fraction: float = Field(0.2, gt=0, lt=1, description="held out for calibration (>= 4 texts)")
    zeta: float = Field(10.0, gt=0, description="w_raw = sigmoid(zeta p - 2); O3's default 10")
    seed: int = 0
    device: str = Field("cpu", description="where training runs, and where load() puts a backbone it loads")


def background_prompts(config: DetectorConfig) -> list[str] | None:
    """The background prompts named by ``config.background`` (None: none). UnlearnConfigError when the file is
    missing or has too few prompts."""
    if config.background is None:
        return None
    path = Path(__file__).with_name(BACKGROUND_FILE) if config.background == "builtin" else Path(config.background)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UnlearnConfigError(f"cannot read the detector background {path}: {exc}; give a UTF-8 text file "
                                 "with one prompt a line, 'builtin', or null for none") from exc
    prompts = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if len(prompts) < BACKGROUND_MIN:
        raise UnlearnConfigError(f"the detector background {path} has {len(prompts)} distinct prompts; it needs "
                                 f"at least {BACKGROUND_MIN} (a few hundred varied ones work best)")
    return prompts
