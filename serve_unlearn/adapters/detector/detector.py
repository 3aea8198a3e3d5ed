"""One forget request's detector: train, score, save and load (safetensors + JSON, with a sha256 per file)."""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ...errors import ArtifactError, GateInputError, UnlearnConfigError, UnlearnDataError
from ..glocal import Calibration, LayerStats, LinearOCSVM, crossfit_parts
from .config import MIN_CALIBRATION, MIN_FIT, DetectorConfig, background_prompts
from .encoder import BASE, SharedEncoder, encoder_of, load_backbone, pooled_features
from .training import train_detector_lora

logger = logging.getLogger(__name__)

FORMAT = "serve-unlearn-o3-detector"
FORMAT_VERSION = 1


def check_texts(texts: Sequence[str], error: type[Exception], what: str) -> list[str]:
    if isinstance(texts, str | bytes) or not isinstance(texts, Sequence):
        raise error(f"{what} must be a list of strings, not a {type(texts).__name__}")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise error(f"{what} must be strings; items {bad[:5]} are {type(texts[bad[0]]).__name__}")
    return list(texts)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class OODDetector:
    """One forget request's detector. Build with :meth:`train` or :meth:`load`; score with :meth:`weights`."""

    def __init__(self, *, config: DetectorConfig, tokenizer, holder: SharedEncoder, adapter: str, lora_start: int,
                 stats: LayerStats, svm: LinearOCSVM, calibration: Calibration, info: dict):
        self.config = config
        self.tokenizer = tokenizer
        self.lora_start = lora_start  # first layer with this detector's LoRA (num_layers: none)
        self.stats, self.svm, self.calibration = stats, svm, calibration
        self.info = info  # what training recorded (sizes, losses); saved in detector.json
        self._holder, self._adapter = holder, adapter
        self._finalizer = self._track()

    def _track(self) -> weakref.finalize:
        """Remove this detector's LoRA from the shared backbone when the detector is garbage-collected."""
        finalizer = weakref.finalize(self, self._holder.remove, self._adapter)
        finalizer.atexit = False  # nothing to tidy in a process that is ending
        return finalizer

    @property
    def backbone_fingerprint(self) -> str:
        return self._holder.fingerprint

    # ---------------------------------------------------------------------------------------- training

    @classmethod
    def train(cls, texts: Sequence[str], config: DetectorConfig | None = None, *,
              progress: bool = True) -> OODDetector:
        """Train on a forget request's texts, written as the gate will see prompts (e.g. bare questions).

        UnlearnDataError for fewer than 12 distinct texts, an empty text or an item that is not a string;
        UnlearnConfigError for a backbone or a background that does not load."""
        config = config or DetectorConfig()
        texts = [t.strip() for t in check_texts(texts, UnlearnDataError, "forget texts")]
        distinct = len({t for t in texts if t})
        if distinct < MIN_CALIBRATION + MIN_FIT:
            raise UnlearnDataError(
                f"the detector needs at least {MIN_CALIBRATION + MIN_FIT} distinct non-empty forget texts "
                f"({MIN_FIT} to fit, {MIN_CALIBRATION} held out to calibrate); got {distinct}"
                + (" (the forget set is empty)" if not texts else ""))
        if any(not t for t in texts):
            raise UnlearnDataError("forget texts must not be empty strings")
        background = background_prompts(config)
        n_rest = max(MIN_CALIBRATION, round(config.calibration_fraction * len(texts)))
        if len(texts) - n_rest < MIN_FIT:
            raise UnlearnDataError(f"calibration_fraction {config.calibration_fraction} holds out {n_rest} of "
                                   f"{len(texts)} texts, leaving fewer than {MIN_FIT} to fit; lower it")
        with torch.random.fork_rng(devices=[]):  # the caller's RNG is left as it was
            torch.manual_seed(config.seed)
            model, encoder, tokenizer = load_backbone(config)
            holder = SharedEncoder.of(encoder)
            order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(config.seed)).tolist()
            rest, used = [texts[i] for i in order[:n_rest]], [texts[i] for i in order[n_rest:]]
            n_layers = holder.num_layers
            k = n_layers if config.lora_layers is None else config.lora_layers
            if k > n_layers:
                raise UnlearnConfigError(f"lora_layers={k} but the backbone has {n_layers} layers")
            info: dict[str, Any] = {"n_fit": len(used), "n_calibration": len(rest),
                                    "mlm_loss": model is not encoder}
            adapter = BASE
            if k:
                from peft import LoraConfig

                lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                  target_modules=config.target_modules,
                                  layers_to_transform=list(range(n_layers - k, n_layers)) if k < n_layers else None,
                                  layers_pattern=holder.layers_name.rsplit(".", 1)[-1] if k < n_layers else None)
                adapter = holder.add(lora)
                info["loss_per_epoch"] = train_detector_lora(holder, adapter, model, tokenizer, used, config, progress)
            del model  # an MLM head is only needed for training
            detector = cls(config=config, tokenizer=tokenizer, holder=holder, adapter=adapter,
                           lora_start=n_layers - k, stats=None, svm=None, calibration=None, info=info)
            detector._fit(used, rest, background)
        cal = detector.calibration
        logger.info("detector trained on %d texts (%d held out): d_H mu1 %.4g, mu2 %.4g, sigma2 %.4g",
                    len(used), len(rest), cal.mu1, cal.mu2, cal.sigma2)
        return detector

    def _fit(self, used: list[str], rest: list[str], background: list[str] | None) -> None:
        """Fit the statistics, the SVM (on out-of-fold scores) and the calibration (on the held-out texts)."""
        c = self.config
        f_used, f_rest = self._features(used, 32), self._features(rest, 32)
        f_background = None if background is None else self._features(background, 32)
        self.info["background"] = None if background is None else {
            "prompts": len(background), "sha256": hashlib.sha256("\n".join(background).encode()).hexdigest()}
        g, cos = crossfit_parts(f_used, min(c.cv_folds, len(used)), c.seed, f_background)
        oof = g + c.gamma * cos
        self.svm = LinearOCSVM.fit(oof, c.nu)
        self.stats = LayerStats.fit(f_used, f_background)
        d_rest = self.svm.decision(self.stats.scores(f_rest, c.gamma))
        self.calibration = Calibration.fit(self.svm.decision(oof), d_rest, c.zeta)

    def _features(self, texts: list[str], batch_size: int) -> torch.Tensor:
        return pooled_features(self._holder, self.tokenizer, self.config.max_length, [self._adapter], self.lora_start,
                       texts, batch_size)[0]

    # ---------------------------------------------------------------------------------------- scoring

    def scores(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """d_H per text: the one-class SVM's signed score, higher = more like the forget data."""
        texts = check_texts(texts, GateInputError, "texts to score")
        return d_h([self], self._features(texts, batch_size)[None])[0].numpy()

    def weights(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Calibrated w_raw in (0, 1) per text, monotone non-decreasing in d_H."""
        return self.calibration.weights(torch.from_numpy(self.scores(texts, batch_size=batch_size))).numpy()

    # ---------------------------------------------------------------------------------------- artifacts

    def save(self, directory: str | Path) -> None:
        """Write the detector (safetensors + JSON, no pickle). detector.json goes last, so a save that died
        half-way is reported as missing by :meth:`load`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "detector.json").unlink(missing_ok=True)
        save_file({**{k: v.contiguous() for k, v in self.stats.tensors().items()}, "svm_coef": self.svm.coef},
                  out / "stats.safetensors")
        files = ["stats.safetensors"]
        if self._adapter != BASE:
            lora_config, state = self._holder.lora_state(self._adapter)
            (out / "lora").mkdir(exist_ok=True)
            lora_config.save_pretrained(out / "lora")
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      out / "lora" / "adapter_model.safetensors")
            files += ["lora/adapter_config.json", "lora/adapter_model.safetensors"]
        tok_files = self.tokenizer.save_pretrained(out / "tokenizer")
        files += sorted(str(Path(f).relative_to(out)) for f in tok_files if Path(f).is_file())
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "config": self.config.model_dump(mode="json"),
            "backbone_fingerprint": self.backbone_fingerprint,
            "backbone": {"model_type": self._holder.encoder.config.model_type,
                         "name_or_path": getattr(self._holder.encoder, "name_or_path", None),
                         "num_layers": self._holder.num_layers},
            "lora_start": self.lora_start,
            "svm_offset": self.svm.offset,
            "svm_shift": self.svm.shift,
            "calibration": self.calibration.to_json(),
            "info": self.info,
            "files": {f: _sha256(out / f) for f in files},
        }
        tmp = out / "detector.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(out / "detector.json")

    @classmethod
    def load(cls, directory: str | Path, backbone: nn.Module | None = None) -> OODDetector:
        """Load a saved detector onto ``backbone`` (a transformers model; LoRA layers are injected into it in
        place, and removed when the last detector on it goes) or, by default, onto the backbone named in its
        config. ArtifactError when a file is missing or corrupt or the backbone is not the one it was trained on."""
        d = Path(directory)
        meta = _read_meta(d)
        try:
            config = DetectorConfig.model_validate(meta["config"])
            tensors = load_file(d / "stats.safetensors")
            background = tensors.get("background")
            stats = LayerStats(mean=tensors["mean"].double(), precision=tensors["precision"].double(),
                               bank=tensors["bank"].double(),
                               background=None if background is None else background.double())
            svm = LinearOCSVM(coef=tensors["svm_coef"].double(), offset=float(meta["svm_offset"]),
                              shift=float(meta.get("svm_shift", 0.0)))
            calibration = Calibration.from_json(meta["calibration"])
            lora_start, n_layers = int(meta["lora_start"]), int(meta["backbone"]["num_layers"])
            fingerprint = str(meta["backbone_fingerprint"])
            shapes_ok = (stats.mean.dim() == 2 and stats.mean.shape[0] == n_layers == svm.coef.shape[0]
                         and stats.precision.shape == (n_layers, stats.mean.shape[1], stats.mean.shape[1])
                         and stats.bank.shape[0] == n_layers and stats.bank.shape[2] == stats.mean.shape[1]
                         and (background is None or (background.dim() == 3 and background.shape[0] == n_layers
                                                     and background.shape[2] == stats.mean.shape[1])))
        except (KeyError, TypeError, ValueError, ValidationError, OSError, RuntimeError, SafetensorError) as exc:
            raise ArtifactError(f"detector {d} is corrupt: {type(exc).__name__}: {exc}") from exc
        if not shapes_ok:
            raise ArtifactError(f"detector {d} is corrupt: its statistics do not have consistent shapes")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(d / "tokenizer")
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"detector {d}: its tokenizer does not load: {exc}") from exc
        if backbone is None:
            backbone = load_backbone(config)[1]
        holder = SharedEncoder.of(encoder_of(backbone))
        if holder.fingerprint != fingerprint or holder.num_layers != n_layers:
            raise ArtifactError(
                f"detector {d} was trained on another backbone (fingerprint {fingerprint[:12]}, "
                f"{meta['backbone'].get('name_or_path')}) than the one given (fingerprint "
                f"{holder.fingerprint[:12]}, {getattr(holder.encoder, 'name_or_path', None)}): different "
                "weights, architecture or dtype; load it with the backbone it was trained on")
        adapter = BASE
        if lora_start < n_layers:
            from peft import LoraConfig

            try:
                lora = LoraConfig.from_pretrained(d / "lora")
                state = load_file(d / "lora" / "adapter_model.safetensors")
            except (OSError, ValueError, TypeError, SafetensorError) as exc:
                raise ArtifactError(f"detector {d}: its LoRA does not load: {exc}") from exc
            try:
                adapter = holder.add(lora, state)
            except ArtifactError as exc:
                raise ArtifactError(f"detector {d}: {exc}") from None
        return cls(config=config, tokenizer=tokenizer, holder=holder, adapter=adapter, lora_start=lora_start,
                   stats=stats, svm=svm, calibration=calibration, info=dict(meta.get("info", {})))

    def _rehome(self, holder: SharedEncoder) -> None:
        """Move this detector's LoRA onto another backbone object with the same fingerprint."""
        if holder is self._holder:
            return
        adapter = BASE
        if self._adapter != BASE:
            config, state = self._holder.lora_state(self._adapter)
            adapter = holder.add(config, {k: v.detach().clone() for k, v in state.items()})
        self._finalizer()  # removes the adapter from the old backbone now
        self._holder, self._adapter = holder, adapter
        self._finalizer = self._track()


def _read_meta(d: Path) -> dict:
    meta_path = d / "detector.json"
    if not meta_path.is_file():
        raise ArtifactError(f"no detector at {d}: {meta_path.name} is missing (was the save interrupted?)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"detector {d}: {meta_path.name} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{meta_path} is not a serve-unlearn detector")
    if meta.get("version") != FORMAT_VERSION:
        raise ArtifactError(f"{meta_path} has format version {meta.get('version')}; this serve-unlearn reads "
                            f"version {FORMAT_VERSION}")
    files = meta.get("files")
    if not isinstance(files, dict) or "stats.safetensors" not in files:
        raise ArtifactError(f"{meta_path} lists no artifact files")
    for name, digest in files.items():
        rel = PurePosixPath(str(name))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ArtifactError(f"{meta_path} lists {name!r}, a path outside its folder; the detector is damaged")
        path = d / name
        if not path.is_file():
            raise ArtifactError(f"detector {d}: {name} is missing")
        if _sha256(path) != digest:
            raise ArtifactError(f"detector {d}: {name} is corrupt (its sha256 differs from the recorded one)")
    return meta


def d_h(detectors: Sequence[OODDetector], feats: torch.Tensor, split: int = 0) -> torch.Tensor:
    """(T, n) d_H of each detector on its slice of the (T, L, n, d) features.

    Below layer ``split`` no detector has a LoRA, so every slice holds the same features there; detectors trained
    on the same background share its nearest-neighbour cosines on those layers (computed once, not T times)."""
    shared: dict[str | None, torch.Tensor] = {}
    out = []
    for det, f in zip(detectors, feats):
        key = (det.info.get("background") or {}).get("sha256")
        if key is not None and split > 0 and key not in shared:
            shared[key] = det.stats.background_cos(f[:split])
        out.append(det.svm.decision(det.stats.scores(f, det.config.gamma, shared.get(key))))
    return torch.stack(out)
