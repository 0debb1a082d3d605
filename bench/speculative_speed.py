"""Speculative decoding's speed: plain decoding against a draft model and prompt lookup.

    python bench/speculative_speed.py [--target out/shakespeare_char_large/best.pt]
        [--draft out/shakespeare_char_draft/best.pt] [--tokens 200] [--gamma 4] [--lookup 3]
        [--repeats 3] [--p-min 0] [--strategies greedy,sample] [--device cpu]
        [--out bench/results/speculative_speed.json]

Batch 1, through `generate` (the events every reader gets). For each strategy, each
repeat runs plain decoding, speculation with the draft and prompt lookup one after the
other (alternating, same prompt, seed = repeat), with ``--p-min P`` > 0 also the draft
with its confidence stop at P ("draft p-min"), and the table gives the median tokens/s
of each and its ratio to plain. Then, untimed:

* acceptance: the share of proposed tokens the target accepted, the mean tokens a
  target pass released (accepted + its own) and the mean proposal length (proposed
  tokens per target pass), stepping the rows directly;
* greedy exactness: whether greedy speculation gave plain greedy's tokens, token for token;
* where the time goes: median ms of a target pass over 1 .. gamma + 1 tokens (a plain
  step; a verify pass) and of a draft step, warm and alternating, averaged over the
  start, middle and end of a generation's context (`pass_times`); with
  them, for each side, the models' time a pass against the measured time a pass, and
  the model-time bound: the speed-up the models' time alone allows (`model_time_bound`),
  which says how much of the gap to a goal is the loop and how much the passes' cost.

``--tiny`` builds two small random models instead of reading checkpoints: a smoke run of
every measurement, not a measurement. The machine is shared: compare figures of one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from model.checkpoint import load_for_generation
from model.config import ModelConfig
from model.generate import Context, SpeculationCounts, generate, prefill
from model.gpt import GPT
from model.speculative import Speculation, SpeculativeRow, check_same_tokenizer
from model.strategy import parse_strategy_with_defaults
from model.tokenizer import CharTokenizer

from clock import timer  # bench/clock.py, beside this file

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "ROMEO:\nI will not speak of it; but, good my lord,\n"


def tiny_models(device: str) -> tuple[GPT, GPT, CharTokenizer]:
    tokenizer = CharTokenizer(sorted(set(PROMPT + "abcdefghijklmnopqrstuvwxyz")))
    models = []
    for seed, shape in ((0, dict(n_layer=2, n_head=2, n_embd=32)), (1, dict(n_layer=1, n_head=1, n_embd=16))):
        torch.manual_seed(seed)
        models.append(GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=64, dropout=0.0, **shape))
                      .to(device).eval())
    return models[0], models[1], tokenizer


def timed(model, tokenizer, spec, tokens: int, seed: int, speculation) -> tuple[float, list[int]]:
    """(tokens/s, the tokens) of one generation of at most ``tokens`` tokens."""
    started = time.perf_counter()
    sample = generate(model, tokenizer, [PROMPT], spec, max_new_tokens=tokens, seed=seed, speculate=speculation)[0]
    return len(sample.tokens) / (time.perf_counter() - started), sample.tokens


def acceptance(model, tokenizer, spec, speculation, tokens: int, seeds: range) -> dict:
    """Proposed and accepted tokens, target passes (and how many had each proposal length)
    and the draft's one-token steps (every proposal's, those stopped by p-min and the
    catch-up steps; its prefills not counted) over ``tokens`` tokens a seed (end-of-text
    does not stop these rows)."""
    counts = SpeculationCounts()
    by_proposals: Counter[int] = Counter()
    draft_steps = 0

    def count_draft_step(module, inputs) -> None:
        nonlocal draft_steps
        draft_steps += inputs[0].size(1) == 1  # a one-token forward; a prefill reads several

    hook = speculation.draft.register_forward_pre_hook(count_draft_step) if speculation.draft is not None else None
    try:
        for seed in seeds:
            row = SpeculativeRow(model, tokenizer.encode(PROMPT), spec, speculation, seed, "exact", tokens,
                                 tokenizer.vocab_size)
            made = 0
            while made < tokens:
                step = row.step(tokens - made)
                made += len(step.tokens)
                counts += SpeculationCounts(step.proposed, step.accepted, 1)
                by_proposals[step.proposed] += 1
    finally:
        if hook is not None:
            hook.remove()
    return {"proposed": counts.proposed, "accepted": counts.accepted, "target_passes": counts.passes,
            "passes_by_proposals": dict(sorted(by_proposals.items())), "draft_steps": draft_steps,
            "acceptance_rate": counts.acceptance_rate, "tokens_per_pass": counts.tokens_per_pass,
            "mean_proposal_length": counts.proposed / counts.passes}


@torch.inference_mode()
def pass_times(model: GPT, draft: GPT | None, tokenizer, gamma: int, tokens: int, repeats: int = 20) -> dict:
    """Median ms of a target pass over t = 1 .. gamma + 1 tokens (t = 1: a plain decode
    step; t = k + 1: the verify pass after k proposals) and of a draft decode step, warm:
    each model's cache is filled once, each timed pass is rolled back off it, and the
    passes alternate within each repeat, as they alternate in speculation. Each model runs
    as the token loop runs it (`Context`: its cache's dtype, its autocast on CUDA). A pass
    costs more as the context grows, so this is done after the prompt, halfway through the
    ``tokens`` new tokens and at their end (within each model's context), and the three
    medians are averaged: the mean cost over a generation."""
    device = next(model.parameters()).device
    clock = timer(device)
    prompt = tokenizer.encode(PROMPT)
    longest = min(len(prompt) + tokens, model.config.block_size) - gamma - 1
    ids = torch.tensor([(prompt * (longest // len(prompt) + 2))[: longest + gamma + 1]], device=device)
    nets = {"target": model} | ({"draft": draft} if draft is not None else {})
    runs = {f"target_{t}_tokens_ms": ("target", t) for t in range(1, gamma + 2)}
    if draft is not None:
        runs["draft_step_ms"] = ("draft", 1)
    medians = {key: [] for key in runs}
    for length in sorted({min(len(prompt), longest), (len(prompt) + longest) // 2, longest}):
        contexts, cached = {}, {}
        for name, net in nets.items():
            cached[name] = min(length, net.config.block_size - gamma - 1)  # a draft may have a shorter context
            contexts[name] = context = Context(net, [ids[0, : cached[name]].tolist()], gamma + 1, "exact")
            with context.precision.autocast():
                prefill(net, ids[:, : cached[name]], context.cache, None)
        times = {key: [] for key in runs}
        for _ in range(repeats):
            for key, (name, t) in runs.items():
                context, start = contexts[name], cached[name]
                with context.precision.autocast():
                    started = clock()
                    nets[name](ids[:, start : start + t], cache=context.cache, last_only=t == 1)
                    times[key].append(clock() - started)
                context.cache.rollback(start)
        for key, values in times.items():
            medians[key].append(statistics.median(values))
    return {key: 1000 * statistics.mean(values) for key, values in medians.items()}


def model_time_bound(figures: dict, times: dict) -> dict:
    """What the models' time alone allows a speculative side: each target pass costs the
    pass over its own proposal length + 1 tokens (`pass_times`), weighted by how often each
    length occurred, plus, for a draft, its one-token steps (``figures["draft_steps"]``, as
    `acceptance` counted them) at a draft step's time. Returns that model time a pass and
    the bound: the speed-up over plain decoding's model time (one single-token pass a
    token) if the loop around the models cost nothing."""
    passes = sum(figures["passes_by_proposals"].values())
    target_ms = sum(count * times[f"target_{k + 1}_tokens_ms"] for k, count in figures["passes_by_proposals"].items())
    draft_ms = figures.get("draft_steps", 0) * times.get("draft_step_ms", 0.0)
    model_ms = (target_ms + draft_ms) / passes
    return {"model_ms_per_pass": model_ms,
            "bound": figures["tokens_per_pass"] * times["target_1_tokens_ms"] / model_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, default=ROOT / "out" / "shakespeare_char_large" / "best.pt",
                        help="the model's checkpoint")
    parser.add_argument("--draft", type=Path, default=ROOT / "out" / "shakespeare_char_draft" / "best.pt",
                        help="the draft's checkpoint (the same tokenizer)")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per generation")
    parser.add_argument("--gamma", type=int, default=4, help="proposal tokens per step")
    parser.add_argument("--lookup", type=int, default=3, help="prompt lookup's n-gram size")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side per strategy; medians reported")
    parser.add_argument("--p-min", type=float, default=0.0, help="with P > 0, one more side: the draft that stops "
                        "proposing where its largest probability is below P (sample.py --draft-p-min); 0: no such side")
    parser.add_argument("--strategies", default="greedy,sample", help="strategy specs, comma-separated "
                        "(a spec with commas of its own: use ';' between specs)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--tiny", action="store_true", help="two small random models instead of the checkpoints: "
                        "a smoke run of every measurement, not a measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "speculative_speed.json")
    args = parser.parse_args()
    if not 0 <= args.p_min < 1:
        parser.error(f"--p-min must be >= 0 and < 1 (0: no such side), got {args.p_min}")
    device = torch.device(args.device)
    if args.tiny:
        model, draft, tokenizer = tiny_models(args.device)
    else:
        model, tokenizer, _ = load_for_generation(args.target, device)
        draft, draft_tokenizer, _ = load_for_generation(args.draft, device)
        check_same_tokenizer(tokenizer, draft_tokenizer, str(args.draft))
    sides = {"plain": None, "draft": Speculation(draft=draft, gamma=args.gamma),
             "prompt lookup": Speculation(lookup=args.lookup, gamma=args.gamma)}
    if args.p_min > 0:
        sides["draft p-min"] = Speculation(draft=draft, gamma=args.gamma, p_min=args.p_min)
    separator = ";" if ";" in args.strategies else ","
    specs = {text: parse_strategy_with_defaults(text) for text in args.strategies.split(separator)}
    print(f"target {model.summary()}\ndraft {draft.summary()}\nbatch 1, {args.tokens} tokens, gamma {args.gamma}, "
          f"lookup n={args.lookup}, p-min {args.p_min}, {torch.get_num_threads()} threads, {args.repeats} repeats",
          flush=True)

    results = {}
    for name, spec in specs.items():
        timed(model, tokenizer, spec, 8, 0, None)  # warm up
        rates, texts = {side: [] for side in sides}, {}
        for repeat in range(args.repeats):
            for side, speculation in sides.items():
                rate, tokens = timed(model, tokenizer, spec, args.tokens, repeat, speculation)
                rates[side].append(rate)
                texts.setdefault(side, tokens)
        medians = {side: statistics.median(values) for side, values in rates.items()}
        accepted = {side: acceptance(model, tokenizer, spec, speculation, args.tokens, range(args.repeats))
                    for side, speculation in sides.items() if speculation is not None}
        results[name] = {"tokens_per_s": medians, "runs": rates, "acceptance": accepted,
                         "speedup": {side: medians[side] / medians["plain"] for side in sides}}
        if spec.is_greedy:
            results[name]["greedy_equals_plain"] = {side: texts[side] == texts["plain"] for side in sides}
        print(f"{name}: " + ", ".join(f"{side} {medians[side]:.1f} tokens/s ({medians[side] / medians['plain']:.2f}x)"
                                      for side in sides), flush=True)

    times = pass_times(model, draft, tokenizer, args.gamma, args.tokens)
    for row in results.values():
        for side, figures in row["acceptance"].items():
            figures |= model_time_bound(figures, times)
            figures["measured_ms_per_pass"] = 1000 * figures["tokens_per_pass"] / row["tokens_per_s"][side]
    print("\n| strategy | side | tokens/s | x plain | acceptance rate | tokens per target pass | mean proposal length "
          "| ms a pass, models | ms a pass, measured | model-time bound |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, row in results.items():
        plain_ms = 1000 / row["tokens_per_s"]["plain"]
        for side in sides:
            figures = row["acceptance"].get(side)
            if figures:
                print(f"| {name} | {side} | {row['tokens_per_s'][side]:.1f} | {row['speedup'][side]:.2f} | "
                      f"{figures['acceptance_rate']:.1%} | {figures['tokens_per_pass']:.2f} | "
                      f"{figures['mean_proposal_length']:.2f} | {figures['model_ms_per_pass']:.2f} | "
                      f"{figures['measured_ms_per_pass']:.2f} | {figures['bound']:.2f}x |")
            else:
                print(f"| {name} | {side} | {row['tokens_per_s'][side]:.1f} | 1.00 | - | 1 | 0 | "
                      f"{times['target_1_tokens_ms']:.2f} | {plain_ms:.2f} | 1.00x |")
    for name, row in results.items():
        if "greedy_equals_plain" in row:
            print(f"{name}: the same tokens as plain decoding: {row['greedy_equals_plain']}")
    print("model passes, median ms (warm, alternating): "
          + ", ".join(f"{key} {value:.2f}" for key, value in times.items()))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "target": model.summary(), "draft": draft.summary(), "tiny": args.tiny, "batch_size": 1,
        "tokens": args.tokens, "gamma": args.gamma, "lookup": args.lookup, "p_min": args.p_min, "device": args.device,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
        "results": results, "pass_times": times,
    }, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
