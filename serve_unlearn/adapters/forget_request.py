"""One forget request, end to end: train its detector and its unlearning LoRA, and record it in the registry.

Everything is written into the registry's private staging folder and only becomes visible when the request is
marked ready, so a crash or an error leaves the request ``failed`` and every earlier one untouched. Artifacts per
request (keys in ``ForgetRequest.artifacts``):

- ``detector``: the OOD detector (safetensors + JSON);
- ``adapter``: this request's own LoRA (what later requests stay orthogonal to);
- ``served``: the adapter a server loads while this is the newest request: the rank-concatenation of every
  request's own adapter (``per-request`` mode) or this request's adapter (``cumulative`` mode, which already
  carries the earlier requests through its warm start).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import Field

from ..config import StrictConfig
from ..data import data_digest, load_jsonl
from ..errors import UnlearnDataError
from ..registry import ForgetRegistry, ForgetRequest, Staging
from .detector import DetectorConfig, OODDetector
from .orthogonal_lora import UnlearnLoraConfig, check_adapter_base, concat_adapters, train_unlearning_lora

logger = logging.getLogger(__name__)


class ForgetConfig(StrictConfig):
    """How a forget request is trained: its detector and its unlearning LoRA (YAML: ``configs/o3_forget.yaml``)."""

    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    lora: UnlearnLoraConfig = Field(default_factory=UnlearnLoraConfig)


def load_forget_records(path: str | Path) -> list[dict]:
    """A forget set: JSONL records with a ``prompt`` (``completion`` optional), or a text file, one prompt a line."""
    path = Path(path)
    if not path.is_file():
        raise UnlearnDataError(f"forget file {str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        records = load_jsonl(path)
        for i, rec in enumerate(records, 1):
            if not isinstance(rec.get("prompt", rec.get("text")), str):
                raise UnlearnDataError(f"{path}:{i}: a forget record needs a 'prompt' (or 'text') string")
            rec.setdefault("prompt", rec.get("text"))
        return records
    records = [{"prompt": line.strip()} for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise UnlearnDataError(f"{path} holds no prompts: the forget set must not be empty")
    return records


def forget(registry: ForgetRegistry, name: str, records: Sequence[dict], *, model, tokenizer,
           config: ForgetConfig | None = None, progress: bool = True,
           on_progress: Callable[[str, int, int], None] | None = None,
           on_detector: Callable[[Path], None] | None = None,
           before_ready: Callable[[Staging], None] | None = None) -> ForgetRequest:
    """Train and register one forget request against the causal LM ``model`` (left unchanged).

    Hooks for a service: ``on_progress(phase, step, total)`` as training goes; ``on_detector(folder)`` once the
    detector is saved (the interim guard); ``before_ready(staging)`` when every artifact is written, before the
    request becomes ready (verification evidence; raising there fails the request)."""
    report = on_progress or (lambda phase, step, total: None)
    config = config or ForgetConfig()
    records = [dict(r) for r in records]
    if not records:
        raise UnlearnDataError("the forget set is empty: give at least one prompt to forget")
    texts = [r.get("prompt") for r in records]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise UnlearnDataError(f"forget records {bad[:5]} have no 'prompt' text")
    earlier = registry.ready()
    modes = {r.config.get("lora", {}).get("mode") for r in earlier}
    if modes and modes != {config.lora.mode}:
        raise UnlearnDataError(f"this registry's requests use LoRA mode {sorted(modes)}; a new request must use "
                               f"the same mode, not {config.lora.mode!r}")
    own = [registry.artifact_path(r, "adapter") for r in earlier]
    for folder in own:
        check_adapter_base(folder, model)
    record = config.model_dump(mode="json")
    with registry.register(name, data_digest(records), record) as staging:
        report("detector", 0, 1)
        detector = OODDetector.train(texts, config.detector, progress=progress)
        detector.save(staging.dir / "detector")
        staging.add_artifact("detector", "detector")
        report("detector", 1, 1)
        if on_detector is not None:
            on_detector(staging.dir / "detector")
        warm = own[-1] if config.lora.mode == "cumulative" and own else None
        train_unlearning_lora(model, tokenizer, records, config.lora, staging.dir / "adapter",
                              earlier_adapters=own, warm_start=warm, request_name=name, progress=progress,
                              on_step=lambda done, total: report("lora", done, total))
        staging.add_artifact("adapter", "adapter")
        if config.lora.mode == "per-request" and own:
            concat_adapters([*own, staging.dir / "adapter"], staging.dir / "served")
            staging.add_artifact("served", "served")
        else:
            staging.add_artifact("served", "adapter")
        if before_ready is not None:
            before_ready(staging)
    request = registry.get(name)
    logger.info("forget request %s (%s) is ready as version %s", request.name, request.id, request.version)
    return request

