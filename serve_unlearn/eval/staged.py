"""The verification of a request that is trained but not yet registered, shared by the control plane's worker and
``serve-unlearn o3 forget --probes``: evaluate the candidate on its probes, keep the (signed) record as an
artifact of the request, and refuse it when the evidence falls short under the policy. ``verify_patch`` does the
same for a weight patch filed with the control plane (``method: salun|iau``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import EvidenceError
from ..registry import ForgetRegistry, Staging
from ..registry.integrity import signing_key
from .policy import VerificationPolicy

RECORD_FILE = "verification.json"


class EvidenceShortfall(EvidenceError):
    """The candidate's probes fall short of the policy (``on_shortfall: refuse``): it is not put in force."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def verify_staged(registry: ForgetRegistry, staging: Staging, name: str, probes: dict, *, model, tokenizer,
                  policy: VerificationPolicy, gate_config=None, extra: dict | None = None) -> dict[str, Any]:
    """Verify the staged request (the gate over every ready detector and the new one, with the new served
    adapter); write ``verification.json`` (signed with ``$SERVE_UNLEARN_SIGNING_KEY`` when set) as its
    ``verification`` artifact; return the summary shown with the request. EvidenceShortfall when it falls short
    and the policy refuses."""
    from .verification import verify_candidate

    earlier = [registry.verified_path(r, "detector") for r in registry.ready()]
    record = verify_candidate(model=model, tokenizer=tokenizer, detector_dir=[*earlier, staging.dir / "detector"],
                              adapter_dir=staging.dir / staging.artifacts["served"], probes=probes, policy=policy,
                              gate_config=gate_config, request={"id": staging.request_id, "name": name,
                                                                **(extra or {})})
    summary = _write(record, staging.dir / RECORD_FILE)
    staging.add_artifact("verification", RECORD_FILE)
    return _in_force_or_raise(record, summary)


def verify_patch(patch: Path, name: str, probes: dict, *, model, tokenizer, policy: VerificationPolicy,
                 request_id: str, extra: dict | None = None) -> dict[str, Any]:
    """The same for a weight patch (SalUn, IAU) of the control plane: ``model`` (in the patch's dtype) with and
    without ``patch``; the record is written beside the patch as ``verification.json``. Returns the summary;
    EvidenceShortfall as above."""
    from .verification import verify_patched

    record = verify_patched(model=model, tokenizer=tokenizer, patch=patch, probes=probes, policy=policy,
                            request={"id": request_id, "name": name, **(extra or {})})
    return _in_force_or_raise(record, _write(record, Path(patch).parent / RECORD_FILE))


def _write(record, path: Path) -> dict[str, Any]:
    """Write the (signed) record; returns the summary shown with the request."""
    from .verification import sign_record

    doc = record.to_dict()
    key = signing_key()
    if key is not None:
        doc = sign_record(doc, key)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True))
    summary = {"passed": record.passed, "flagged": record.flagged, "reasons": record.reasons,
               "deltas": record.deltas, "report_digest": record.report_digest, "signed": key is not None,
               "forget_accuracy": record.candidate.get("forget", {}).get("accuracy"),
               "retain_accuracy": {"base": record.base.get("retain", {}).get("accuracy"),
                                   "candidate": record.candidate.get("retain", {}).get("accuracy")}}
    return summary


def _in_force_or_raise(record, summary: dict[str, Any]) -> dict[str, Any]:
    if not record.put_in_force:
        raise EvidenceShortfall("the verification probes show the request falls short: " + "; ".join(record.reasons)
                                + " (policy on_shortfall: refuse; the record is in the request's result)", summary)
    return summary
