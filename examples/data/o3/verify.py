"""Check the O3 evaluation data: structure, and the base model's QA accuracy per file.

    .venv/bin/python examples/data/o3/verify.py                 # every QA file in this folder
    .venv/bin/python examples/data/o3/verify.py FILE ... --show-wrong
    .venv/bin/python examples/data/o3/verify.py FILE --keep-correct OUT.jsonl   # filter a candidate file

Loads SmolLM2-135M-Instruct (``prepare_smollm2()``) once with transformers on CPU and scores each file with
``serve_unlearn.eval.qa.qa_accuracy`` (greedy, chat template, keyword match, max_new_tokens 32), so the
numbers are the ones the O3 benchmark sees. Prompts are sorted by length before batching (less padding);
results are mapped back to file order.

Structure checks (always run, no model needed with ``--no-model``): every record loads with ``load_qa``; no
keyword occurs in its own question; no duplicate questions in a file; paraphrase files point at a valid
``source`` index in their topic file with the same keywords and a different question; retain and
retain_heldout are disjoint; no question appears in two files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))

from serve_unlearn.eval.qa import is_correct, load_qa


def qa_files(folder: Path) -> list[Path]:
    topics = sorted(p for p in folder.glob("topic_*.jsonl") if not p.stem.endswith("_paraphrases"))
    out: list[Path] = []
    for t in topics:
        out.append(t)
        para = t.with_name(f"{t.stem}_paraphrases.jsonl")
        if para.exists():
            out.append(para)
    out += [p for p in (folder / "retain.jsonl", folder / "retain_heldout.jsonl") if p.exists()]
    return out


def _norm(q: str) -> str:
    return " ".join(q.lower().split())


def check_structure(paths: list[Path]) -> list[str]:
    """Return a list of problems (empty when the data is consistent)."""
    problems: list[str] = []
    seen: dict[str, Path] = {}
    loaded = {p: load_qa(p) for p in paths}
    for path, items in loaded.items():
        names = set()
        for i, it in enumerate(items):
            q = _norm(it["prompt"])
            if q in names:
                problems.append(f"{path.name}[{i}]: duplicate question {it['prompt']!r}")
            names.add(q)
            if q in seen and seen[q] != path:
                problems.append(f"{path.name}[{i}]: question also in {seen[q].name}: {it['prompt']!r}")
            seen.setdefault(q, path)
            for a in it["answers"]:
                if a in it["prompt"].lower():
                    problems.append(f"{path.name}[{i}]: keyword {a!r} occurs in the question {it['prompt']!r}")
            if not is_correct(it["completion"], it["answers"]):
                problems.append(f"{path.name}[{i}]: the reference completion has none of the keywords")
        if path.stem.endswith("_paraphrases"):
            topic = path.with_name(path.stem[: -len("_paraphrases")] + ".jsonl")
            src_items = loaded.get(topic) or load_qa(topic)
            sources = [it.get("source") for it in items]
            if len(set(sources)) != len(sources):
                problems.append(f"{path.name}: several paraphrases share a source")
            for i, it in enumerate(items):
                s = it.get("source")
                if not isinstance(s, int) or not 0 <= s < len(src_items):
                    problems.append(f"{path.name}[{i}]: bad source {s!r}")
                    continue
                orig = src_items[s]
                if _norm(orig["prompt"]) == _norm(it["prompt"]):
                    problems.append(f"{path.name}[{i}]: paraphrase equals its source question")
                if sorted(orig["answers"]) != sorted(it["answers"]):
                    problems.append(f"{path.name}[{i}]: keywords differ from source {s}")
    return problems


def load_model(dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve_unlearn.models.packaged import prepare_smollm2

    path = prepare_smollm2()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, tok


def score(model, tok, items: list[dict], batch_size: int, max_new_tokens: int) -> list[tuple[bool, str]]:
    """Per-item (correct, generated answer), in file order; batches of similar prompt length."""
    from serve_unlearn.eval.qa import qa_accuracy

    order = sorted(range(len(items)), key=lambda i: len(tok(items[i]["prompt"])["input_ids"]))
    _, outs = qa_accuracy(model, tok, [items[i] for i in order], max_new_tokens=max_new_tokens,
                          batch_size=batch_size)
    res: list[tuple[bool, str]] = [(False, "")] * len(items)
    for i, text in zip(order, outs):
        res[i] = (is_correct(text, items[i]["answers"]), text)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="QA JSONL files (default: every QA file in this folder)")
    ap.add_argument("--show-wrong", action="store_true", help="print each missed question and the model's answer")
    ap.add_argument("--keep-correct", type=Path, help="write the items the model answers correctly here "
                                                       "(one input file only)")
    ap.add_argument("--no-model", action="store_true", help="structure checks only")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)

    paths = args.files or qa_files(HERE)
    if args.keep_correct and len(paths) != 1:
        ap.error("--keep-correct takes exactly one input file")
    problems = check_structure(paths) if not args.keep_correct else []
    for p in problems:
        print(f"PROBLEM {p}")
    unrelated = HERE / "unrelated.txt"
    if not args.files and unrelated.exists():
        lines = [ln for ln in unrelated.read_text(encoding="utf-8").splitlines() if ln.strip()]
        print(f"{unrelated.name}: {len(lines)} lines")
    if args.no_model:
        return 1 if problems else 0

    t0 = time.time()
    model, tok = load_model(args.dtype)
    print(f"model loaded ({args.dtype}) in {time.time() - t0:.1f}s", flush=True)
    for path in paths:
        items = load_qa(path)
        t = time.time()
        res = score(model, tok, items, args.batch_size, args.max_new_tokens)
        n_ok = sum(ok for ok, _ in res)
        print(f"{path.name}: {n_ok}/{len(items)} = {100 * n_ok / len(items):.1f}%  ({time.time() - t:.0f}s)",
              flush=True)
        if args.show_wrong:
            for i, (ok, text) in enumerate(res):
                if not ok:
                    print(f"  MISS [{i}] {items[i]['prompt']}  {items[i]['answers']}\n     -> {text[:160]!r}")
        if args.keep_correct:
            with args.keep_correct.open("w", encoding="utf-8") as fh:
                for it, (ok, _) in zip(items, res):
                    if ok:
                        fh.write(json.dumps(it, ensure_ascii=False) + "\n")
            print(f"kept {n_ok} items in {args.keep_correct}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
