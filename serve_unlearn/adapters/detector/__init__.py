"""O3's per-request out-of-distribution detector: does a prompt look like the data of this forget request?

Method (O3's "unlearning knowledge detection": the out-of-distribution detector of each forget request):

1. An encoder backbone (default: the packaged all-MiniLM-L6-v2; any HF encoder such as roberta-large by path) gets a
   LoRA on query/key/value, trained with O3's contrastive entropy loss (CEL): for each layer after the embeddings,
   the softmax over a batch of raw dot products between the pooled hidden states of an MLM-masked *query* view
   (LoRA on) and of the clean *key* view (the frozen backbone) is pushed to low entropy. The frozen key encoder is
   the same model with its LoRA disabled, so there is no second copy. Where the backbone has an MLM head (e.g.
   roberta-large) the MLM loss on the query view is added 1:1, as O3; MiniLM ships without an MLM head, so there
   the CEL is the whole loss (a random head would only teach the LoRA to fit noise).
2. Per layer, the fine-tuned encoder's pooled hidden states give a glocal score (``glocal``): a Gaussian
   log-density with a Ledoit-Wolf precision plus gamma times the nearest-neighbour cosine to the forget texts
   (less the nearest-neighbour cosine to a background of ordinary prompts: a deviation, below).
3. A linear one-class SVM turns the per-layer scores into d_H, higher = more like the forget data.
4. d_H is calibrated into w_raw in (0, 1) on a held-out part of the forget data only (never retained data).

Deviations from the reference code, each for a reason:

- *Masked mean pooling* over real tokens (the reference averages over all 512 padded positions, so its features
  depend on the prompt's length).
- *All layers after the embeddings* are scored, and the CEL covers them all (the reference uses roberta-large's
  first 12 of 24).
- *Shrinkage covariance* (Ledoit-Wolf) instead of the empirical one: a request has tens of texts and d >= 384.
- *The local term is added*, not subtracted: the reference writes ``g - gamma*cos``, but a linear one-class SVM's
  weights are a non-negative combination of the training score vectors, so with ``-gamma*cos`` a closer nearest
  neighbour *lowers* d_H while a higher density raises it, and the terms cancel (the AUROC with each sign is in
  the README). For the same reason the SVM sees the scores translated so that the least is positive
  (``glocal.LinearOCSVM``).
- *A background of ordinary prompts* (``DetectorConfig.background``; default: 480 packaged prompts over 48
  domains, none of them close to our evaluation data): the local term is the nearest forget text's cosine *minus*
  the nearest background prompt's, so a prompt that shares only the forget data's question template ("What is a
  group of stars called?" against "What is a group of crows called?") is not taken for the topic; fewer retain
  prompts get a high w_raw and more held-out paraphrases do (measured in the README; ``glocal``).
  ``background: null`` is O3's purely one-class score.
- *Out-of-fold scores* for fitting the SVM and for mu1 (``glocal.crossfit_parts``): in-sample, each text is its
  own nearest neighbour and sits inside its own Gaussian, which no new prompt does.
- *A one-sided test*: p(d) = 1 for d >= x0, so a prompt more typical than the forget data is never down-weighted
  (the reference's two-sided test did), and w_raw is monotone non-decreasing in d_H.
- *No detector LoRA* by default (``DetectorConfig.lora_layers`` = 0; k = the top k layers, ``None`` = every layer
  as O3), so an ensemble runs the encoder once for all requests (see :class:`DetectorEnsemble`). On MiniLM with a
  few dozen texts the CEL-trained LoRA barely moves AUROC or routing either way (README); the glocal score does
  the work.

Data needed: at least 12 distinct forget texts with the defaults (``MIN_CALIBRATION`` = 4 held out to calibrate,
``MIN_FIT`` = 8 to fit the LoRA, the Gaussians and the SVM); a few dozen give a useful detector.

Artifacts are safetensors + JSON only, with a sha256 of every file: ``detector.json``, ``stats.safetensors``,
``lora/`` (a peft adapter folder; absent when ``lora_layers`` is 0) and ``tokenizer/``.

Modules: ``config`` (:class:`DetectorConfig`, the background prompts), ``encoder`` (the backbone shared by every
detector's LoRA), ``training`` (CEL), ``detector`` (:class:`OODDetector`: train, score, save, load) and
``ensemble`` (:class:`DetectorEnsemble`).
"""

from .config import BACKGROUND_FILE, MIN_CALIBRATION, MIN_FIT, DetectorConfig, background_prompts
from .detector import FORMAT, FORMAT_VERSION, OODDetector
from .encoder import backbone_fingerprint, tokenizer_digest
from .ensemble import DetectorEnsemble
from .training import contrastive_entropy

__all__ = [
    "BACKGROUND_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "MIN_CALIBRATION",
    "MIN_FIT",
    "DetectorConfig",
    "DetectorEnsemble",
    "OODDetector",
    "backbone_fingerprint",
    "background_prompts",
    "contrastive_entropy",
    "tokenizer_digest",
]
