"""SmolLM2 on the embedded instruction task: ROUGE-L and exact match before and after, every attack, bytes, wall.

Each point (a recipe at its defaults, ``guarded`` at the current default operating point)
runs through :func:`guardedtuning.trilemma.sweep` (the in-process runner, the schedule's
rounds, the harness's attacks on the first seed), on ``data.name=synthetic-instruct`` with
``model.name`` (default ``smollm2-135m``, the real weights). "Before" is the model the
point's server starts from, evaluated as the run evaluates: the split model built from the
point's config with its seed (zero-initialised LoRA: the pretrained model; ``guarded``: with
its freshly initialised 4-number release projection), on the same held-out rows. "After"
is the last round's evaluation. ``offsite`` rows add the emulator's and full fine-tuning's
utility and the emulator gap (plug-in minus emulator) from the run's record.

    python simulations/smollm2_instruct.py --out runs/smollm2/decoder \\
        --point split --point guarded --point fedlora --point central-ft
    python simulations/smollm2_instruct.py --out runs/smollm2/offsite --point offsite

``--check-logits FILE`` first compares the loaded model's float64 logits and token ids on a
fixed prompt with the ones in FILE (written by ``--save-logits FILE`` on another machine;
``simulations/smollm2_logits.json`` is this repository's, from the cached conversion): the
weights must be the same wherever the run happens (``simulations/smollm2_weights.py`` hashes
every tensor when they are not). Writes ``smollm2.md`` / ``smollm2.json`` in ``--out`` and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "The capital of France is"


def logits_probe(model_name: str) -> dict[str, Any]:
    """The probe prompt's token ids and the unsplit-equivalent split model's last-position logits, in float64.

    Float64 (the split built as the runs build it, then cast), CPU: on the same weights two
    machines agree to ~1e-6 (measured: torch 2.11 vs 2.13, max |diff| 2e-5 on a logit in
    float32, and the float32 sum of the 49,152 logits 0.49 apart, which is what the float32 probe
    this replaces flagged). ``logits``: the first 64, then the float64 sum of all and the argmax.
    """
    import torch

    from guardedtuning.config import LoraConfig, ModelConfig
    from guardedtuning.models.loading import load_tokenizer
    from guardedtuning.models.parts import split_model

    tok = load_tokenizer(model_name)
    model = split_model(ModelConfig(name=model_name), 2, LoraConfig(), 1, "cpu", 0).to(torch.float64).eval()
    token_ids = tok(PROMPT)["input_ids"]
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        out = model.logits(ids, torch.ones_like(ids))[0, -1].double()
    return {"dtype": "float64", "token_ids": token_ids,
            "logits": [float(x) for x in out[:64]] + [float(out.sum()), float(out.argmax())]}


def check_logits(ref_path: str, got: dict[str, Any]) -> str | None:
    """None when ``got`` matches the probe saved in ``ref_path``, else what differs and what to do."""
    ref = json.loads(Path(ref_path).read_text())
    if ref.get("dtype") != "float64" or "token_ids" not in ref:
        return (f"--check-logits {ref_path}: an old float32 probe file (no dtype/token_ids); re-save it with "
                "--save-logits on the reference machine")
    if ref["token_ids"] != got["token_ids"]:
        return f"the probe's token ids differ ({got['token_ids']} here, {ref['token_ids']} in {ref_path}): the tokenizer"
    a, b = ref["logits"], got["logits"]
    worst = max(abs(x - y) for x, y in zip(a[:64], b[:64], strict=True))
    if worst > 1e-4 or abs(a[64] - b[64]) > 1e-2 or a[65] != b[65]:
        return (f"the weights loaded here differ from {ref_path}'s: max |logit diff| {worst:.3g} (limit 1e-4), "
                f"sum {b[64]:.6f} vs {a[64]:.6f} (limit 1e-2), argmax {b[65]:.0f} vs {a[65]:.0f}")
    return None


def before(cfg: Any) -> dict[str, float]:
    """The point's starting model, evaluated as its run evaluates (server device, held-out rows)."""
    from guardedtuning.data.sources import load_task
    from guardedtuning.evaluation import evaluate
    from guardedtuning.models.loading import load_tokenizer
    from guardedtuning.models.parts import split_model
    from guardedtuning.server_app.common import server_device

    task = load_task(cfg.data, cfg.seed)
    dev = server_device(cfg)
    model = split_model(cfg.model, cfg.split, cfg.lora, task.num_labels, str(dev), cfg.seed, lora_top=cfg.lora.top)
    return evaluate(model, load_tokenizer(cfg.model.name), task, max_length=cfg.model.max_length,
                    batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens, device=dev)


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


ATTACK_COLS = ("eia_nn", "eia_nn_adaptive", "eia_ridge", "eia_mlp", "eia_transformer", "eia_opt", "aia",
               "update", "update_secure")


def table(rows: list[dict[str, Any]]) -> list[str]:
    head = ["point", "ROUGE-L before", "ROUGE-L after", "EM before", "EM after", *ATTACK_COLS, "AIA majority",
            "bytes / client-round", "run s", "attack s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["point"], _f(r["rouge_l_before"]), _f(r["rouge_l_after"]),
                                        _f(r["em_before"]), _f(r["em_after"]), *(_f(r.get(a)) for a in ATTACK_COLS),
                                        _f(r.get("aia_majority")), _f(r.get("bytes_per_client_round")),
                                        _f(r.get("wall_s"), 1), _f(r.get("attack_s"), 1)]) + " |")
    off = [r for r in rows if r.get("offsite")]
    if off:
        lines += ["", "| point | plug-in EM | emulator EM | full-FT EM | emulator gap (EM) | plug-in ROUGE-L | "
                      "emulator ROUGE-L | full-FT ROUGE-L | emulator gap (ROUGE-L) |", "|" + "---|" * 9]
        for r in off:
            o = r["offsite"]
            lines.append("| " + " | ".join([r["point"], *(_f(o.get(k)) for k in (
                "plug_in", "emulator", "full_ft", "emulator_gap", "plug_in_rouge_l", "emulator_rouge_l",
                "full_ft_rouge_l", "emulator_gap_rouge_l"))]) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--point", action="append", default=[], help="a trilemma point (recipe[:k=v,...]); repeatable")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--schedule", default="fast", help="a trilemma schedule: fast or full")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="run-config overrides under every point (after the schedule's)")
    ap.add_argument("--attack", action="append", default=[], metavar="KEY=VALUE",
                    help="AttackOptions overrides (e.g. victim_rows=8), after the schedule's")
    ap.add_argument("--save-logits", help="write the logits probe of --model to this JSON file and exit (after --check-logits)")
    ap.add_argument("--check-logits", help="compare the logits probe of --model with this JSON file first")
    args = ap.parse_args()

    import dataclasses

    from guardedtuning.config import parse_set
    from guardedtuning.trilemma import in_process_runner, parse_point, point_config, schedule, sweep

    if args.check_logits or args.save_logits:
        probe = logits_probe(args.model)
        if args.check_logits:
            problem = check_logits(args.check_logits, probe)
            if problem:
                print(f"{problem}; stopping", file=sys.stderr)
                return 3
            print(f"logits probe matches {args.check_logits} (float64, token ids equal)", flush=True)
        if args.save_logits:
            Path(args.save_logits).write_text(json.dumps({"model": args.model, "prompt": PROMPT, **probe}))
            return 0
    sched = schedule(args.schedule)
    opts = sched.attacks
    names = {f.name for f in dataclasses.fields(opts)}
    for kv in args.attack:
        k, _, v = kv.partition("=")
        if k not in names:
            print(f"--attack {kv!r}: {k!r} is not an attack option; pick one of {', '.join(sorted(names))}",
                  file=sys.stderr)
            return 2
        cur = getattr(opts, k)
        val = tuple(v.split(":")) if k == "attacks" else tuple(float(x) for x in v.split(":")) \
            if k == "noise_levels" else type(cur)(v)
        opts = dataclasses.replace(opts, **{k: val})
    base = {**sched.sets, "model.name": args.model, "data.name": "synthetic-instruct", **parse_set(args.sets)}
    points = [parse_point(p) for p in args.point or ["split", "guarded", "fedlora", "central-ft"]]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def on_event(kind: str, point: Any, data: dict[str, Any]) -> None:
        msg = data.get("message") or (f"utility {data.get('utility')}" if kind == "done" else data.get("seed", ""))
        print(f"[{time.perf_counter() - t0:7.1f}s] {point.name}: {kind} {msg}", flush=True)

    befores = {}
    for p in points:
        cfg = point_config(p, base, int(base.get("seed", 0)), out / p.name / "seed0")
        tb = time.perf_counter()
        befores[p.name] = before(cfg)
        print(f"[{time.perf_counter() - t0:7.1f}s] {p.name}: before {befores[p.name]} "
              f"({time.perf_counter() - tb:.1f} s)", flush=True)
    rows = sweep(points, base, out, runner=in_process_runner, attack_options=opts,
                 about=f"Schedule {sched.name}: {sched.about}.", on_event=on_event)
    result = []
    for p, row in zip(points, rows, strict=True):
        rec_path = out / p.name / "seed0" / "results.json"
        rec = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
        last = (rec.get("history") or [{}])[-1]
        r = {**row, "rouge_l_before": befores[p.name].get("rouge_l"), "em_before": befores[p.name].get("exact_match"),
             "rouge_l_after": last.get("rouge_l"), "em_after": last.get("exact_match"),
             "eval_rows": last.get("eval_rows"), "history": rec.get("history")}
        u = rec.get("utility", {})
        if "emulator" in u:
            r["offsite"] = {k: u.get(k) for k in ("plug_in", "emulator", "full_ft", "emulator_gap", "plug_in_gap")}
            r["offsite"].update({k: last.get(k) for k in ("emulator_rouge_l", "full_ft_rouge_l")})
            r["offsite"]["plug_in_rouge_l"] = last.get("rouge_l")
            if last.get("emulator_rouge_l") is not None and last.get("rouge_l") is not None:
                r["offsite"]["emulator_gap_rouge_l"] = last["rouge_l"] - last["emulator_rouge_l"]
        result.append(r)
    lines = [f"# {args.model} on synthetic-instruct, schedule {sched.name} ({sched.about})", "",
             f"sets: {json.dumps(base, sort_keys=True)}; attack options: {json.dumps(dataclasses.asdict(opts))}", "",
             *table(result), "", f"total {time.perf_counter() - t0:.1f} s; host {os.uname().nodename}"]
    (out / "smollm2.md").write_text("\n".join(lines) + "\n")
    (out / "smollm2.json").write_text(json.dumps(result, indent=2, default=str))
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
