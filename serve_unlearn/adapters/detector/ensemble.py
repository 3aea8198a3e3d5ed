"""Several detectors on one backbone in memory, scored with one shared encoder pass per batch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...errors import ArtifactError, GateInputError, UnlearnConfigError
from .detector import OODDetector, check_texts, d_h
from .encoder import pooled_features, tokenizer_digest


class DetectorEnsemble:
    """T detectors on ONE backbone in memory, scored with one shared encoder pass per batch.

    The layers below the lowest LoRA of any detector run once; from there the batch is repeated T times and each
    copy goes through its own detector's LoRA as a peft mixed batch. With O3's LoRA on every layer that is T
    times the encoder's work in one forward; with ``lora_layers=k`` only the top k layers are repeated. Detectors
    loaded onto different copies of the same backbone are moved onto the first one's.
    """

    def __init__(self, detectors: Sequence[OODDetector]):
        detectors = list(detectors)
        if not detectors:
            raise UnlearnConfigError("an ensemble needs at least one detector")
        first = detectors[0]
        for i, det in enumerate(detectors[1:], 1):
            if det.backbone_fingerprint != first.backbone_fingerprint:
                raise ArtifactError(f"detector {i} was trained on another backbone than detector 0 "
                                    f"({det.backbone_fingerprint[:12]} vs {first.backbone_fingerprint[:12]}); "
                                    "an ensemble shares one backbone")
            if (tokenizer_digest(det.tokenizer) != tokenizer_digest(first.tokenizer)
                    or det.config.max_length != first.config.max_length):
                raise ArtifactError(f"detector {i} tokenizes differently from detector 0 (tokenizer or "
                                    "max_length); an ensemble shares one tokenization")
        for det in detectors[1:]:
            det._rehome(first._holder)
        self.detectors = detectors
        self._split = min(det.lora_start for det in detectors)

    @classmethod
    def load(cls, directories: Sequence[str | Path], backbone: nn.Module | None = None) -> DetectorEnsemble:
        """Load saved detectors onto one backbone (loaded once; by default from the first detector's config)."""
        if not directories:
            raise UnlearnConfigError("an ensemble needs at least one detector")
        first = OODDetector.load(directories[0], backbone)
        rest = [OODDetector.load(d, first._holder.encoder) for d in directories[1:]]
        return cls([first, *rest])

    def scores(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """(T, n) d_H of every detector."""
        texts = check_texts(texts, GateInputError, "texts to score")
        first = self.detectors[0]
        feats = pooled_features(first._holder, first.tokenizer, first.config.max_length,
                        [d._adapter for d in self.detectors], self._split, texts, batch_size)
        return d_h(self.detectors, feats, self._split).numpy()

    def weights(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """(T, n) calibrated w_raw of every detector (what the gate takes the max over)."""
        d = torch.from_numpy(self.scores(texts, batch_size))
        return torch.stack([det.calibration.weights(row) for det, row in zip(self.detectors, d)]).numpy()
