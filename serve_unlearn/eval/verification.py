"""Evidence per forget request: evaluate a trained candidate against the request's probes before it is put in
force, decide by a policy, and sign the record.

``verify_candidate`` runs the harness twice on the request's probes (held-out questions about the forgotten
data, and retain questions): on the base model, and on the candidate (the base model behind a gate over the
request's detector folder(s) with its adapter folder, the staging folders before the request is in the
registry). The :class:`VerificationRecord` holds both sets of aggregate metrics (never the generated texts: a
record is shown to whoever asked for the deletion, and the base model's answers are the data being deleted),
the probes' digests, the base model's fingerprint, a sha256 manifest of every artifact file, the time, the
policy, and the verdict.

The verdict: ``passed`` when the candidate's accuracy on the forget probes is at most ``max_forget_accuracy``
and its accuracy on the retain probes is at most ``max_retain_drop`` below the base model's. When it is not,
``on_shortfall`` says what the caller does: ``refuse`` (default: the request is not put in force) or ``flag``
(put in force, ``flagged`` set). ``put_in_force`` is the one flag a caller acts on.

Signing: ``sign_record`` adds ``{"signature": {"alg": "HMAC-SHA256", "value": hex}}``, an HMAC-SHA256 with the
operator's key over the canonical JSON of every other field (keys sorted, no spaces, UTF-8); ``verify_record``
recomputes it. ``serve-unlearn eval verify FILE`` takes the key from ``$SERVE_UNLEARN_SIGNING_KEY`` (the key the
registry signs its rows with).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EvalDataError, EvidenceError
from ..registry.integrity import SIGNING_KEY_ENV, folder_manifest
from .data import eval_set_from_records
from .harness import EvalConfig, evaluate
from .policy import VerificationPolicy

__all__ = ["RECORD_KIND", "VerificationPolicy", "VerificationRecord", "canonical_json", "sign_record",
           "verify_candidate", "verify_patched", "verify_record", "verify_record_file"]

RECORD_KIND = "serve-unlearn/verification-record/1"
_SUMMARY_KEYS = ("accuracy", "paraphrase_accuracy", "rouge_l_recall", "refusal_rate", "answer_probability", "n",
                 "digest")


@dataclass
class VerificationRecord:
    created_at: str
    policy: dict[str, Any]
    probes: dict[str, dict[str, Any]]
    base: dict[str, dict[str, Any]]
    candidate: dict[str, dict[str, Any]]
    deltas: dict[str, float | None]
    model_fingerprint: str
    artifacts: dict[str, Any]
    report_digest: str
    passed: bool
    flagged: bool
    reasons: list[str]
    gate: dict[str, Any] = field(default_factory=dict)
    request: dict[str, Any] | None = None
    harness: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    kind: str = RECORD_KIND

    @property
    def put_in_force(self) -> bool:
        """True when the request may be put in force: it passed, or it fell short under ``on_shortfall: flag``."""
        return self.passed or self.flagged

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True, allow_nan=False)


def canonical_json(doc: Mapping[str, Any]) -> bytes:
    """What is signed: the record without its ``signature``, keys sorted, no whitespace, UTF-8."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise EvidenceError(f"the record cannot be written as canonical JSON ({exc})") from None


def _check_key(key: bytes) -> bytes:
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes) or not key:
        raise EvidenceError(f"a signing key is needed (non-empty bytes; e.g. ${SIGNING_KEY_ENV})")
    return key


def sign_record(record: Mapping[str, Any], key: bytes) -> dict[str, Any]:
    """A copy of ``record`` (a dict, e.g. ``VerificationRecord.to_dict()``) with its HMAC-SHA256 signature."""
    mac = hmac.new(_check_key(key), canonical_json(record), hashlib.sha256).hexdigest()
    return {**{k: v for k, v in record.items() if k != "signature"},
            "signature": {"alg": "HMAC-SHA256", "value": mac}}


def verify_record(doc: Any, key: bytes) -> None:
    """EvidenceError unless ``doc`` is a verification record whose signature matches ``key``."""
    key = _check_key(key)
    if not isinstance(doc, dict) or doc.get("kind") != RECORD_KIND:
        raise EvidenceError(f"not a serve-unlearn verification record (kind {RECORD_KIND!r})")
    sig = doc.get("signature")
    if not isinstance(sig, dict) or sig.get("alg") != "HMAC-SHA256" or not isinstance(sig.get("value"), str):
        raise EvidenceError("the record is not signed (no HMAC-SHA256 signature); sign it with sign_record")
    expected = hmac.new(key, canonical_json(doc), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, sig["value"]):
        raise EvidenceError("the signature does not match: the record was changed after it was signed, or it was "
                            "signed with another key")


def verify_record_file(path: str | os.PathLike, key: bytes | None = None) -> dict[str, Any]:
    """Read and verify a signed record file (key: ``$SERVE_UNLEARN_SIGNING_KEY`` when not given); the record."""
    if key is None:
        env = os.environ.get(SIGNING_KEY_ENV)
        if not env:
            raise EvidenceError(f"set ${SIGNING_KEY_ENV} to the operator key the record was signed with")
        key = env.encode()
    try:
        doc = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise EvidenceError(f"no record file at {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvidenceError(f"{path} is not a JSON verification record ({exc}); it was damaged or is another "
                            "file") from None
    verify_record(doc, key)
    return doc


def _summary(result: dict) -> dict[str, dict[str, Any]]:
    return {name: {k: s[k] for k in _SUMMARY_KEYS if k in s} for name, s in result["sets"].items()}


def _manifest(folder: str | os.PathLike, prefix: str) -> dict[str, Any]:
    files = folder_manifest(Path(folder), prefix)
    if not files:
        raise EvalDataError(f"artifact folder {folder} holds no files")
    return _digested(files)


def _digested(files: dict[str, str]) -> dict[str, Any]:
    """An artifact's file digests and one digest over them (what the record names the artifact by)."""
    digest = hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {"files": files, "digest": digest}


def _verdict(policy: VerificationPolicy, sets, base: dict, cand: dict) -> tuple[list[str], dict]:
    reasons = []
    f_acc = cand["forget"]["accuracy"]["mean"]
    r_drop = base["retain"]["accuracy"]["mean"] - cand["retain"]["accuracy"]["mean"]
    deltas = {"forget_accuracy_base": base["forget"]["accuracy"]["mean"], "forget_accuracy_candidate": f_acc,
              "retain_accuracy_base": base["retain"]["accuracy"]["mean"],
              "retain_accuracy_candidate": cand["retain"]["accuracy"]["mean"], "retain_accuracy_drop": r_drop}
    if len(sets["forget"]) < policy.min_forget_probes:
        reasons.append(f"{len(sets['forget'])} forget probes, fewer than min_forget_probes={policy.min_forget_probes}")
    if len(sets["retain"]) < policy.min_retain_probes:
        reasons.append(f"{len(sets['retain'])} retain probes, fewer than min_retain_probes={policy.min_retain_probes}")
    if f_acc > policy.max_forget_accuracy:
        reasons.append(f"forget accuracy {f_acc:.3f} is above max_forget_accuracy={policy.max_forget_accuracy}: "
                       "the candidate still answers the forgotten questions")
    if r_drop > policy.max_retain_drop:
        reasons.append(f"retain accuracy dropped by {r_drop:.3f}, more than max_retain_drop={policy.max_retain_drop}")
    return reasons, deltas


def verify_candidate(*, model, tokenizer, detector_dir: str | os.PathLike | Sequence[str | os.PathLike],
                     adapter_dir: str | os.PathLike, probes: Mapping[str, Sequence[Mapping[str, Any]]],
                     policy: VerificationPolicy | None = None, gate_config=None, progress: bool = False,
                     request: Mapping[str, Any] | None = None) -> VerificationRecord:
    """Evaluate the base ``model`` and the candidate (the gate over ``detector_dir`` -- one folder, or every
    in-force request's and the new one's, in order -- with ``adapter_dir``) on ``probes`` = ``{"forget": [...],
    "retain": [...]}`` (records as the harness reads them: ``question``/``prompt`` and ``answer``/``answers``).
    ``model`` is left as it was. ``request`` (e.g. ``{"id": ..., "name": ...}``) is copied into the record."""
    from ..adapters.orthogonal_lora import base_model_fingerprint
    from ..serving.gated_generator import GatedGenerator
    from .targets import GatedTarget, LocalTarget

    policy = policy or VerificationPolicy()
    sets = _probe_sets(probes)
    dirs = [detector_dir] if isinstance(detector_dir, (str, os.PathLike)) else list(detector_dir)
    artifacts = {"detectors": [_manifest(d, "detector") for d in dirs], "adapter": _manifest(adapter_dir, "adapter")}
    config = EvalConfig(max_new_tokens=policy.max_new_tokens, batch_size=policy.batch_size,
                        probabilities=policy.probabilities, n_boot=policy.n_boot)
    t0 = time.perf_counter()
    fingerprint = base_model_fingerprint(model)
    base = evaluate(LocalTarget(model, tokenizer, "base"), sets, config, progress=progress)
    gen = GatedGenerator.from_folders(model, tokenizer, dirs, adapter_dir, gate_config)
    try:
        cand = evaluate(GatedTarget(gen, "candidate"), sets, config, progress=progress)
    finally:
        gen.close()
    if base_model_fingerprint(gen.base) != fingerprint:
        raise EvidenceError("the base model changed while the candidate was evaluated; nothing was recorded")
    weights = cand["gate"]["weights"]
    gate = {name: {"mean_weight": sum(w) / len(w), "n": len(w)} for name, w in weights.items()}
    auroc = cand["gate"].get("auroc_forget_vs_retain")
    gate["auroc_forget_vs_retain"] = auroc["auc"] if auroc else None
    return _record(policy, sets, config, base, cand, fingerprint, artifacts, gate, request, t0)


def verify_patched(*, model, tokenizer, patch: str | os.PathLike, probes: Mapping[str, Sequence[Mapping[str, Any]]],
                   policy: VerificationPolicy | None = None, progress: bool = False,
                   request: Mapping[str, Any] | None = None) -> VerificationRecord:
    """The same evidence for a weight patch (SalUn, IAU): ``model`` (in the patch's dtype) before and with the
    patch applied; the patch is reverted afterwards, so ``model`` is left as it was."""
    from ..patches.apply import apply_patch, revert_patch
    from .targets import LocalTarget, file_sha256, model_fingerprint

    policy = policy or VerificationPolicy()
    sets = _probe_sets(probes)
    artifact = _digested({f"patch/{Path(patch).name}": file_sha256(patch)})
    config = EvalConfig(max_new_tokens=policy.max_new_tokens, batch_size=policy.batch_size,
                        probabilities=policy.probabilities, n_boot=policy.n_boot)
    t0 = time.perf_counter()
    fingerprint = model_fingerprint(model)
    base = evaluate(LocalTarget(model, tokenizer, "base"), sets, config, progress=progress)
    undo = apply_patch(model, patch)
    try:
        cand = evaluate(LocalTarget(model, tokenizer, "candidate"), sets, config, progress=progress)
    finally:
        revert_patch(model, patch, undo=undo)
    if model_fingerprint(model) != fingerprint:
        raise EvidenceError("the base model changed while the patch was evaluated; nothing was recorded")
    return _record(policy, sets, config, base, cand, fingerprint, {"patch": artifact},
                   {}, request, t0)


def _probe_sets(probes) -> dict:
    if not isinstance(probes, Mapping) or not probes.get("forget") or not probes.get("retain"):
        raise EvalDataError("a verification needs probes {'forget': [...], 'retain': [...]}, both non-empty: "
                            "held-out questions about the forgotten data, and questions it must still answer")
    unknown = set(probes) - {"forget", "retain"}
    if unknown:
        raise EvalDataError(f"unknown probe sets {sorted(unknown)}; expected 'forget' and 'retain'")
    return {name: eval_set_from_records(name, probes[name], f"probes.{name}") for name in ("forget", "retain")}


def _record(policy, sets, config, base, cand, fingerprint, artifacts, gate, request, t0) -> VerificationRecord:
    base_s, cand_s = _summary(base), _summary(cand)
    reasons, deltas = _verdict(policy, sets, base_s, cand_s)
    passed = not reasons
    from .. import __version__

    return VerificationRecord(
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), policy=policy.model_dump(),
        probes={n: {"n": len(s), "digest": s.digest} for n, s in sets.items()}, base=base_s, candidate=cand_s,
        deltas=deltas, model_fingerprint=fingerprint, artifacts=artifacts,
        report_digest=hashlib.sha256(canonical_json({"base": base_s, "candidate": cand_s})).hexdigest(),
        passed=passed, flagged=not passed and policy.on_shortfall == "flag", reasons=reasons, gate=gate,
        request=dict(request) if request else None,
        harness={"serve_unlearn": __version__, "eval_config": config.model_dump()},
        seconds=time.perf_counter() - t0)
