"""The GPU benchmark of issue 6, run on the H100 host: our engine against transformers in the same run, bf16, random
weights at real shapes (Qwen2.5-0.5B, SmolLM2-135M; a Qwen3-MoE of Qwen3-30B-A3B's widths on request).

    python3 bench/gpu_bench.py --output-json bench/results/gpu_h100.json
    python3 bench/gpu_bench.py --shapes qwen3-moe-30b-a3b-12l --sections throughput,decode,agreement \
        --num-prompts 128 --output-json bench/results/gpu-moe-h100.json

Sections (each prints its numbers; all land in one JSON with the command, the GPU name and software versions):
- throughput: vLLM's offline workload (N requests, input and output lengths uniform in [lo, hi], ignore_eos);
  baseline: transformers `generate` in padded batches on a subset (tokens/s is what is compared). Our engine first
  runs a warm-up workload of other prompts (no prefix-cache hits carry over) of the same size: a few-second run
  otherwise pays one-time costs, such as compiling the kernel variants of mixed prefill/decode batches, that
  transformers' minute-long run does not notice.
- decode: batch-1 ms per token and achieved bandwidth (weight bytes / step) against the measured copy bandwidth.
- memory: the compiler's predicted peak against torch.cuda.max_memory_reserved() for three settings.
- agreement: top-1 agreement of teacher-forced logits with transformers for the same weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Real shapes from the models' published config.json files.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    # Qwen3-30B-A3B's widths (128 experts of 768, top 8, q/k norms) on 12 of its 48 layers: 7.8B parameters, so that
    # transformers' copy fits beside ours on one 80 GB GPU in turn.
    "qwen3-moe-30b-a3b-12l": dict(
        model_type="qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        num_hidden_layers=12,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}


def write_random_model(shape: str, path: Path, seed: int = 0) -> Path:
    """A random-weight bf16 checkpoint with a word-level tokenizer covering the whole vocabulary ("t0" .. "tN")."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    spec = dict(SHAPES[shape])
    model_type = spec.pop("model_type")
    config = transformers.AutoConfig.for_model(
        model_type, **spec, bos_token_id=0, eos_token_id=1, pad_token_id=0, torch_dtype="bfloat16"
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(spec["vocab_size"])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_level.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, bos_token="t0", eos_token="t1", pad_token="t0", unk_token="t0"
    )
    tokenizer.save_pretrained(path)
    return path


def workload(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(2, vocab) for _ in range(rng.randint(lo, hi))], rng.randint(lo, hi)) for _ in range(n)]


def free_gpu() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def generate_seconds(llm: Any, workload: list[tuple[list[int], int]]) -> float:
    """Wall time of one offline generate over the workload (greedy, ignore_eos)."""
    from vdeploy_engine import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=out, ignore_eos=True) for _, out in workload]
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in workload], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == sum(out for _, out in workload), "ignore_eos requests must produce exactly max_tokens"
    return elapsed


def run_ours(
    model_dir: Path, requests: list[tuple[list[int], int]], warmup: list[tuple[list[int], int]], **engine_args: Any
) -> dict:
    """Times `requests` after running `warmup` (whose time is recorded too)."""
    from vdeploy_engine import LLM

    llm = LLM(str(model_dir), dtype="bfloat16", **engine_args)
    warmup_seconds = generate_seconds(llm, warmup)
    result = tokens_per_second(requests, generate_seconds(llm, requests))
    del llm
    free_gpu()
    return dict(result, warmup_seconds=round(warmup_seconds, 3))


def run_transformers(model_dir: Path, requests: list[tuple[list[int], int]], batch_size: int) -> dict:
    """transformers `generate` in padded batches (left padding), each batch as long as its longest request; only the
    tokens each request asked for count."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(requests), batch_size):
            batch = requests[i : i + batch_size]
            width = max(len(p) for p, _ in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device="cuda")
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device="cuda")
            new = max(out for _, out in batch)
            model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0
            )
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del model
    free_gpu()
    return tokens_per_second(requests, elapsed)


def tokens_per_second(requests: list[tuple[list[int], int]], elapsed: float) -> dict:
    out_tokens = sum(out for _, out in requests)
    all_tokens = out_tokens + sum(len(p) for p, _ in requests)
    return dict(
        requests=len(requests),
        seconds=round(elapsed, 3),
        requests_per_s=round(len(requests) / elapsed, 3),
        output_tokens_per_s=round(out_tokens / elapsed, 1),
        total_tokens_per_s=round(all_tokens / elapsed, 1),
    )


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    import torch

    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    free_gpu()
    return 2 * (1 << 30) / sorted(times)[len(times) // 2]


def batch1_decode(
    model_dir: Path, weight_bytes: int, bandwidth: float, profile_path: Path | None = None, **engine_args: Any
) -> dict:
    """Per-token decode time at batch 1: (time for 1 + N tokens - time for 1 token) / N, prompt of 128 tokens."""
    from vdeploy_engine import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype="bfloat16", **engine_args)
    prompt = list(range(2, 130))
    timings = {}
    for n in (1, 257):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        llm.generate([prompt], params, use_tqdm=False)  # warm-up (and graph capture)
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            llm.generate([prompt], params, use_tqdm=False)
            runs.append(time.perf_counter() - start)
        timings[n] = sorted(runs)[1]
    step = (timings[257] - timings[1]) / 256
    forward = graph_replay_seconds(llm)
    if profile_path is not None:
        write_decode_profile(llm, prompt, profile_path)
    del llm
    free_gpu()
    achieved = weight_bytes / step
    return dict(
        ms_per_token=round(step * 1e3, 3),
        tokens_per_s=round(1 / step, 1),
        weight_bytes=weight_bytes,
        achieved_bytes_per_s=round(achieved),
        copy_bytes_per_s=round(bandwidth),
        fraction_of_roofline=round(achieved / bandwidth, 3),
        # The forward pass alone (one CUDA-graph replay, no scheduling or sampling): what the kernels achieve.
        forward_ms=None if forward is None else round(forward * 1e3, 3),
        forward_fraction_of_roofline=None if forward is None else round(weight_bytes / forward / bandwidth, 3),
    )


def print_decode(shape: str, label: str, d: dict) -> None:
    print(
        f"[{shape}] batch-1 decode{label}: {d['ms_per_token']} ms/token, {d['fraction_of_roofline']:.0%} of copy "
        f"bandwidth; forward alone {d['forward_ms']} ms ({d['forward_fraction_of_roofline']})",
        flush=True,
    )


def write_decode_profile(llm: Any, prompt: list[int], path: Path) -> None:
    """torch.profiler over 64 batch-1 decode steps: host ops by self CPU time, GPU kernels by GPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vdeploy_engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=65, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt], params, use_tqdm=False)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    with open(path, "w") as f:
        f.write("64 decode steps + 1 prefill at batch 1\n\n== host, by self CPU time ==\n")
        f.write(averages.table(sort_by="self_cpu_time_total", row_limit=40))
        f.write("\n\n== device, by GPU time ==\n")
        f.write(averages.table(sort_by="self_device_time_total", row_limit=40))


def graph_replay_seconds(llm: Any) -> float | None:
    """Median time of one batch-1 decode graph replay (None when running eagerly)."""
    import torch

    graphs = llm.llm_engine.runner.graphs
    if graphs is None:
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(50):
        start.record()
        graphs.replay(1)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def memory_accuracy(model_dir: Path, settings: list[dict]) -> list[dict]:
    """Predicted peak (weights + activations + CUDA graphs + KV cache, the parts torch's allocator holds) against
    torch.cuda.max_memory_reserved() after start-up and a full-batch workload."""
    import torch

    from vdeploy.compiler import plan_from_args
    from vdeploy_engine import LLM, SamplingParams

    rows = []
    for setting in settings:
        free_gpu()
        plan = plan_from_args(str(model_dir), dtype="bfloat16", **setting)
        m = plan.memory
        predicted = m.weights_bytes + m.activation_bytes + m.cuda_graph_bytes + m.kv_cache_bytes
        llm = LLM(str(model_dir), dtype="bfloat16", **setting)
        n = plan.engine.max_num_seqs
        prompt_len = min(plan.engine.max_model_len // 2, 512)
        llm.generate(
            [list(range(2, 2 + prompt_len))] * n,
            SamplingParams(max_tokens=16, ignore_eos=True),
            use_tqdm=False,
        )
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_reserved()
        del llm
        rows.append(
            dict(
                setting=setting,
                predicted_bytes=predicted,
                measured_max_reserved_bytes=measured,
                ratio=round(predicted / measured, 4),
                under_predicted=predicted < measured,
            )
        )
    free_gpu()
    return rows


def top1_agreement(model_dir: Path, num_seqs: int = 8, seq_len: int = 256) -> dict:
    """Teacher-forced logits of our model and transformers' on the same random token sequences."""
    import torch
    from transformers import AutoModelForCausalLM

    from vdeploy_engine.config import EngineConfig
    from vdeploy_engine.layers.attention import AttentionMetadata
    from vdeploy_engine.loader import load_hf_config, load_model

    gen = torch.Generator().manual_seed(0)
    config = EngineConfig(model=str(model_dir), dtype="bfloat16", device="cuda", kv_cache_memory_bytes=1 << 30)
    hf_config = load_hf_config(config)
    tokens = torch.randint(2, hf_config.vocab_size, (num_seqs, seq_len), generator=gen).cuda()

    ours = load_model(config, hf_config)
    flat = tokens.flatten()
    positions = torch.arange(seq_len, device="cuda").repeat(num_seqs)
    cu = torch.arange(0, (num_seqs + 1) * seq_len, seq_len, dtype=torch.int32, device="cuda")
    meta = AttentionMetadata(
        slot_mapping=torch.full_like(flat, -1),
        seq_lens=torch.full((num_seqs,), seq_len, dtype=torch.int32, device="cuda"),
        block_tables=torch.zeros(num_seqs, 1, dtype=torch.int32, device="cuda"),
        cu_seqlens_q=cu,
    )
    with torch.inference_mode():
        our_top1 = ours.compute_logits(ours(flat, positions, meta)).argmax(-1).view(num_seqs, seq_len)
    del ours
    free_gpu()

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    with torch.inference_mode():
        hf_logits = hf(tokens).logits.float()
    hf_top1 = hf_logits.argmax(-1)
    # Where transformers' own top two are closer than bf16 can resolve, either answer is right: report both figures.
    top2 = hf_logits.topk(2, dim=-1).values
    resolvable = (top2[..., 0] - top2[..., 1]) > 1e-2 * top2[..., 0].abs().clamp(min=1)
    agree = our_top1 == hf_top1
    del hf
    free_gpu()
    return dict(
        tokens=agree.numel(),
        top1_agreement=round(agree.float().mean().item(), 4),
        resolvable_tokens=int(resolvable.sum()),
        top1_agreement_resolvable=round(agree[resolvable].float().mean().item(), 4),
    )


def write_report(report: dict, path: Path | None) -> None:
    """Prints the report as JSON and writes it to path, if given."""
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen2.5-0.5b,smollm2-135m")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--baseline-prompts", type=int, default=32, help="requests transformers runs (a subset)")
    parser.add_argument("--baseline-batch-size", type=int, default=32)
    parser.add_argument("--sections", default="throughput,decode,memory,agreement")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--output-json", type=Path)
    parser.add_argument("--profile-dir", type=Path, help="write a torch.profiler table of batch-1 decode per shape here")
    parser.add_argument(
        "--compare-pdl", action="store_true", help="also time batch-1 decode without programmatic dependent launch"
    )
    args = parser.parse_args()

    import torch
    import transformers
    import triton

    sections = set(args.sections.split(","))
    engine_args = dict(max_model_len=2 * args.max_len, enforce_eager=args.enforce_eager)
    report: dict[str, Any] = dict(
        command="python3 " + shlex.join(sys.argv),
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        transformers=transformers.__version__,
        results={},
    )
    bandwidth = copy_bandwidth() if "decode" in sections else 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            model_dir = write_random_model(shape, Path(tmp) / shape)
            vocab = SHAPES[shape]["vocab_size"]
            result: dict[str, Any] = {}
            if "throughput" in sections:
                requests = workload(args.num_prompts, args.min_len, args.max_len, vocab, seed=0)
                warmup = workload(args.num_prompts, args.min_len, args.max_len, vocab, seed=1)
                ours = run_ours(model_dir, requests, warmup, max_num_seqs=256, **engine_args)
                base = run_transformers(model_dir, requests[: args.baseline_prompts], args.baseline_batch_size)
                ratio = ours["output_tokens_per_s"] / base["output_tokens_per_s"]
                result["throughput"] = dict(ours=ours, transformers=base, output_tokens_ratio=round(ratio, 2))
                print(
                    f"[{shape}] throughput: ours {ours['output_tokens_per_s']} out tok/s, transformers "
                    f"{base['output_tokens_per_s']} -> {ratio:.1f}x",
                    flush=True,
                )
            if "decode" in sections:
                weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
                profile = args.profile_dir / f"decode-profile-{shape}.txt" if args.profile_dir else None
                result["decode"] = batch1_decode(
                    model_dir, weight_bytes, bandwidth, profile, max_num_seqs=8, **engine_args
                )
                print_decode(shape, "", result["decode"])
                if args.compare_pdl:
                    import vdeploy_kernels.launch

                    vdeploy_kernels.launch.ENABLED = False
                    result["decode_without_pdl"] = batch1_decode(
                        model_dir, weight_bytes, bandwidth, max_num_seqs=8, **engine_args
                    )
                    vdeploy_kernels.launch.ENABLED = True
                    print_decode(shape, " without PDL", result["decode_without_pdl"])
                    ratio = result["decode_without_pdl"]["ms_per_token"] / result["decode"]["ms_per_token"]
                    result["decode_pdl_speedup"] = round(ratio, 3)
            if "memory" in sections:
                settings = [
                    dict(max_model_len=2048, max_num_seqs=64, gpu_memory_utilization=0.5, enforce_eager=True),
                    dict(max_model_len=4096, max_num_seqs=128, gpu_memory_utilization=0.7),
                    dict(max_model_len=8192, max_num_seqs=256, gpu_memory_utilization=0.9),
                ]
                result["memory"] = memory_accuracy(model_dir, settings)
                for row in result["memory"]:
                    print(f"[{shape}] memory {row['setting']}: predicted/measured {row['ratio']}", flush=True)
            if "agreement" in sections:
                result["agreement"] = top1_agreement(model_dir)
                print(f"[{shape}] top-1 agreement: {result['agreement']}", flush=True)
            report["results"][shape] = result
    write_report(report, args.output_json)


if __name__ == "__main__":
    main()
