"""Training-step speed: our BertForPreTraining against transformers', same weights, batch and machine.

One full step each (forward, MLM + NSP loss, backward, AdamW) at the same shapes and masked positions:

* ours: ``PretrainModule.model_step``'s computation (MLM head on the masked positions only, logits (N, V)),
  with ``tasks.optim.build_optimizer``'s AdamW (fused on CPU, no decay on bias/LayerNorm);
* transformers: ``BertForPreTraining(labels=..., next_sentence_label=...)`` as a user would call it (logits
  (B, T, V), loss over them with -100 everywhere but the masked positions) with a plain ``torch.optim.AdamW``;
* optionally ours after ``model.compile()`` (what ``PretrainModule(compile=True)`` does), compile time
  reported apart.

Both start from the same weights (our state dict loaded into transformers' model), train mode, dropout 0.1.
Measurements are interleaved (A, B, A, B, ... the order flipping every round) after warm-up, and each
figure is a median over rounds; the ratio is the median of the per-round paired ratios. On a shared
machine another process on one of the two cores does not slow a step evenly, it stalls every parallel op
for a scheduler slice (a 4 MiB add goes from ~0.1 to 4-8 ms), which distorts ratios too, not only absolute
times: a probe before and after each measurement waits such periods out and re-takes measurements that
saw one, rounds that stay contended are dropped from the medians (when half or more are clean), and the
best step of each implementation is reported next to the median.

MFU = useful model FLOPs per second / fp32 matmul peak measured in the same run (best of several large
``torch.mm``). Useful FLOPs = 6 x (matmul weights x the tokens that go through them) + attention scores, with
the MLM decoder counted at the masked positions only, for both implementations: work transformers spends on
vocab logits at unmasked positions is waste, and shows as lower MFU.

    python benchmarks/train_speed.py                      # tiny and mini, vocab 16k, seq 128, batch 32
    python benchmarks/train_speed.py --compile --json out.json
    python benchmarks/train_speed.py --quick              # smoke run: tiny, few rounds (< 20 s)
    python benchmarks/train_speed.py --device cuda --precision bf16-mixed --models mini,base --batch 128

On a GPU both implementations run under the same autocast (``bf16-mixed``: what ``trainer=gpu`` does through
Lightning), the peak is a matmul of the same dtype on that GPU, and the CPU contention probe is off (a GPU
machine is not shared the way the 2 dev cores are); ``float(loss)`` synchronises every step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bert.model import BertConfig, BertForPreTraining, count_parameters  # noqa: E402
from tasks.optim import build_optimizer  # noqa: E402

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4  # special ids of the synthetic batch (the tokenizer's layout)
FIRST_WORD = 5


# ----------------------------------------------------------------------------------------------- batch
def make_batch(
    batch: int, seq: int, vocab: int, mask_prob: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Full-length sentence pairs ``[CLS] A [SEP] B [SEP]`` masked like BERT's create_pretraining_data.

    Per sequence, round(mask_prob x non-special tokens) positions are drawn without replacement; 80% of them
    become [MASK], 10% a random word, 10% stay. ``mlm_labels`` is -100 except at those positions.
    """
    input_ids = torch.randint(FIRST_WORD, vocab, (batch, seq), generator=generator)
    token_type_ids = torch.zeros(batch, seq, dtype=torch.long)
    mlm_labels = torch.full((batch, seq), -100, dtype=torch.long)
    n_words = seq - 3
    for i in range(batch):
        len_a = int(torch.randint(1, n_words, (), generator=generator))
        sep_a = 1 + len_a
        input_ids[i, 0], input_ids[i, sep_a], input_ids[i, seq - 1] = CLS, SEP, SEP
        token_type_ids[i, sep_a + 1 :] = 1
        candidates = torch.tensor([p for p in range(1, seq - 1) if p != sep_a])
        n_pred = max(1, round(mask_prob * len(candidates)))
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:n_pred]]
        mlm_labels[i, chosen] = input_ids[i, chosen]
        action = torch.rand(n_pred, generator=generator)
        input_ids[i, chosen[action < 0.8]] = MASK
        rand_pos = chosen[(action >= 0.8) & (action < 0.9)]
        input_ids[i, rand_pos] = torch.randint(FIRST_WORD, vocab, (len(rand_pos),), generator=generator)
    return {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "mlm_labels": mlm_labels,
        "nsp_labels": torch.randint(0, 2, (batch,), generator=generator),
    }


# ----------------------------------------------------------------------------------------------- FLOPs
def useful_flops(cfg: BertConfig, batch: int, seq: int, n_masked: float) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward), useful work only."""
    H, L, inner = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    tokens = batch * seq
    per_token = L * (4 * H * H + 2 * H * inner)  # Q, K, V, attention output, FFN in and out
    forward = 2 * per_token * tokens
    forward += 2 * L * 2 * batch * seq * seq * H  # scores Q.K^T and probs.V
    forward += 2 * (H * H + 2 * H) * batch  # pooler + NSP classifier on [CLS]
    forward += 2 * (H * H + H * cfg.vocab_size) * n_masked  # MLM transform + decoder, masked rows only
    return 3.0 * forward


def matmul_peak(n: int, repeats: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Best torch.mm throughput (FLOP/s) of an n x n product in `dtype` on `device` (CPU: torch's threads)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b)
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def autocast_for(device: str, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """The autocast Lightning's `precision` puts around forward (and loss): none for 32-true."""
    if precision == "32-true":
        return contextlib.nullcontext
    if precision != "bf16-mixed":
        raise ValueError(f"--precision {precision!r}: 32-true or bf16-mixed")
    return lambda: torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)


class ContentionProbe:
    """Is another process on our cores? A parallel elementwise op on 4 MiB takes ~0.1 ms on two idle cores,
    but 4-8 ms when one of them is taken: every OpenMP region then waits a scheduler slice for its second
    thread. Such periods distort ratios as well as absolute times, so they are waited out, and a measurement
    during which our threads sat in the run queue (Linux schedstat) is taken again or dropped."""

    def __init__(self, threshold_ms: float):
        self.x = torch.randn(1 << 20)
        self.threshold = threshold_ms / 1e3
        self.has_schedstat = Path("/proc/self/task").is_dir() and self.runqueue_s() is not None

    @staticmethod
    def runqueue_s() -> float | None:
        """Seconds this process's threads have spent runnable but waiting for a CPU, summed (None: unknown)."""
        total = 0
        try:
            for task in os.listdir("/proc/self/task"):
                try:
                    with open(f"/proc/self/task/{task}/schedstat") as handle:
                        total += int(handle.read().split()[1])
                except (OSError, IndexError, ValueError):
                    continue  # a thread that just exited
        except OSError:
            return None
        return total / 1e9

    def busy(self) -> bool:
        times = []
        for _ in range(9):
            t0 = time.perf_counter()
            self.x.add(self.x)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) > self.threshold

    def wait(self, max_s: float) -> float:
        t0 = time.perf_counter()
        while self.busy() and time.perf_counter() - t0 < max_s:
            time.sleep(0.5)
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- steps
@dataclass
class Impl:
    name: str
    step: Callable[[dict[str, torch.Tensor]], float]
    times: list[float] = field(default_factory=list)
    warmup_s: list[float] = field(default_factory=list)
    runqueue_s: float = 0.0  # time our threads waited for a CPU during timed steps (other processes)


def ours_step(model: BertForPreTraining, optimizer: torch.optim.Optimizer, autocast=contextlib.nullcontext):
    """PretrainModule.model_step's losses + backward + AdamW (Lightning's own per-step overhead left out)."""

    def step(b: dict[str, torch.Tensor]) -> float:
        mlm_labels = b["mlm_labels"]
        masked = mlm_labels.ne(-100)
        with autocast():
            out = model(
                b["input_ids"],
                token_type_ids=b["token_type_ids"],
                attention_mask=b["attention_mask"],
                masked_positions=masked,
            )
            mlm_loss = F.cross_entropy(out.mlm_logits.float(), mlm_labels[masked])
            nsp_loss = F.cross_entropy(out.nsp_logits.float(), b["nsp_labels"])
            loss = mlm_loss + nsp_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def transformers_step(model, optimizer: torch.optim.Optimizer, autocast=contextlib.nullcontext):
    def step(b: dict[str, torch.Tensor]) -> float:
        with autocast():
            out = model(
                input_ids=b["input_ids"],
                token_type_ids=b["token_type_ids"],
                attention_mask=b["attention_mask"],
                labels=b["mlm_labels"],
                next_sentence_label=b["nsp_labels"],
            )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        return float(out.loss.detach())

    return step


def tune_malloc() -> bool:
    """Keep glibc from returning big buffers to the OS after every step (fresh pages fault on first touch)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


# ----------------------------------------------------------------------------------------------- run
def bench_model(
    name: str, args: argparse.Namespace, peak: float, probe: ContentionProbe, log: Callable[[str], None]
) -> list[dict]:
    import transformers

    cfg = BertConfig.from_preset(name, vocab_size=args.vocab, max_position_embeddings=max(512, args.seq))
    torch.manual_seed(args.seed)
    ours = BertForPreTraining(cfg).train()
    theirs = transformers.BertForPreTraining(transformers.BertConfig(**cfg.to_transformers_dict()))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.to(args.device)
    theirs.to(args.device).train()
    autocast = autocast_for(args.device, args.precision)
    optim_cfg = {"lr": args.lr, "weight_decay": 0.01}
    their_opt = torch.optim.AdamW(theirs.parameters(), lr=args.lr)  # torch's default (foreach on CUDA)
    impls = [
        Impl("ours", ours_step(ours, build_optimizer(ours, optim_cfg, 10_000)["optimizer"], autocast)),
        Impl("transformers", transformers_step(theirs, their_opt, autocast)),
    ]
    if args.compile:
        compiled = copy.deepcopy(ours)
        compiled.compile()  # in place, as PretrainModule(compile=True) does
        opt = build_optimizer(compiled, optim_cfg, 10_000)["optimizer"]
        impls.append(Impl("ours+compile", ours_step(compiled, opt, autocast)))

    g = torch.Generator().manual_seed(args.seed)
    # two batches with different numbers of masked rows: a compiled model meets a new N every step in real
    # training, so it has to settle on dynamic shapes during warm-up, as it would there
    batches = [
        {k: v.to(args.device) for k, v in make_batch(args.batch, args.seq, args.vocab, p, g).items()}
        for p in (args.mask_prob, args.mask_prob + 0.01)
    ]
    n_masked = statistics.fmean(int(b["mlm_labels"].ne(-100).sum()) for b in batches)

    for impl in impls:
        for i in range(args.warmup):
            t0 = time.perf_counter()
            impl.step(batches[i % len(batches)])
            impl.warmup_s.append(time.perf_counter() - t0)
        log(f"  {name} {impl.name}: warm-up steps {', '.join(f'{s:.2f}' for s in impl.warmup_s)} s")

    def timed(impl: Impl, r: int) -> tuple[float, bool, int]:
        """Seconds per step of one measurement, whether the cores looked idle before and after it, and the
        number of attempts: a measurement that saw contention is taken again (up to --retries times)."""
        for attempt in range(1 + args.retries):
            if args.max_wait > 0:
                probe.wait(args.max_wait)
            quiet_before = not probe.busy()
            rq0, t0 = probe.runqueue_s(), time.perf_counter()
            for i in range(args.steps):
                impl.step(batches[(r * args.steps + i) % len(batches)])
            wall = time.perf_counter() - t0
            rq1 = probe.runqueue_s()
            waited = rq1 - rq0 if rq0 is not None and rq1 is not None else 0.0
            impl.runqueue_s += waited
            if quiet_before and not probe.busy() and waited <= args.max_runqueue * wall:
                return wall / args.steps, True, attempt + 1
        return wall / args.steps, False, attempt + 1

    clean: list[bool] = []  # per round: every implementation's measurement clean
    for r in range(args.rounds):
        ok, tries = True, []
        for impl in impls if r % 2 == 0 else impls[::-1]:
            seconds, quiet, attempts = timed(impl, r)
            impl.times.append(seconds)
            ok &= quiet
            tries.append(attempts)
        clean.append(ok)
        log(
            f"  {name} round {r + 1}/{args.rounds}: "
            + ", ".join(f"{i.name} {i.times[-1] * 1e3:.0f} ms" for i in impls)
            + ("" if ok else "  [contended]")
            + (f"  ({sum(tries) - len(tries)} re-taken)" if sum(tries) > len(tries) else "")
        )
    # statistics over the clean rounds when at least half are clean, else over all (and say so)
    use = [i for i, c in enumerate(clean) if c] if 2 * sum(clean) >= len(clean) else list(range(len(clean)))

    ref = next(i for i in impls if i.name == "transformers")
    flops = useful_flops(cfg, args.batch, args.seq, n_masked)
    tokens = args.batch * args.seq
    rows = []
    for impl in impls:
        step_s = statistics.median(impl.times[i] for i in use)
        ratios = [ref.times[i] / impl.times[i] for i in use]
        row = {
            "model": name,
            "impl": impl.name,
            "params": count_parameters(ours),
            "tokens_per_s": tokens / step_s,
            "examples_per_s": args.batch / step_s,
            "step_ms": step_s * 1e3,
            "step_ms_all": [t * 1e3 for t in impl.times],
            "step_ms_best": min(impl.times) * 1e3,
            "ratio_of_best": min(ref.times) / min(impl.times),
            "rounds_used": len(use),
            "rounds_clean": sum(clean),
            "runqueue_wait_s": impl.runqueue_s,
            "ratio": statistics.median(ratios),
            "ratio_all": ratios,
            "useful_gflop_per_step": flops / 1e9,
            "tflops": flops / step_s / 1e12,
            "mfu": flops / step_s / peak,
            "n_masked_mean": n_masked,
        }
        if impl.name.endswith("compile"):
            # first steps minus a settled step: tracing, inductor codegen and gcc (cold cache) plus the
            # recompile for a dynamic number of masked rows
            row["compile_s"] = sum(impl.warmup_s) - len(impl.warmup_s) * min(impl.times)
        rows.append(row)
    return rows


def print_table(rows: list[dict], meta: dict) -> None:
    head = [
        "model",
        "impl",
        "tokens/s",
        "examples/s",
        "step ms",
        "best ms",
        "ratio",
        "TFLOP/s",
        "MFU %",
        "compile s",
    ]
    body = [
        [
            r["model"],
            r["impl"],
            f"{r['tokens_per_s']:,.0f}",
            f"{r['examples_per_s']:.1f}",
            f"{r['step_ms']:.0f}",
            f"{r['step_ms_best']:.0f}",
            f"{r['ratio']:.2f}x",
            f"{r['tflops']:.3f}",
            f"{100 * r['mfu']:.1f}",
            f"{r['compile_s']:.0f}" if "compile_s" in r else "",
        ]
        for r in rows
    ]
    where = f"{meta['threads']} threads" if meta["device"] == "cpu" else meta["device"]
    title = (
        f"training step, {meta['precision']}, vocab {meta['vocab']}, seq {meta['seq']}, batch {meta['batch']}, "
        f"{where}, {meta['peak_dtype']} matmul peak {meta['peak_gflops']:.0f} GFLOP/s"
    )
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, h in enumerate(head):
            table.add_column(h, justify="left" if i < 2 else "right")
        for line in body:
            table.add_row(*line)
        Console(width=max(120, Console().width)).print(table)
    except ImportError:
        widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(head)]
        print(title)
        for line in [head, *body]:
            print(
                "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
            )
    clean = {(r["model"], r["rounds_used"], r["rounds_clean"]) for r in rows}
    print(
        "tokens/s, step ms: medians over interleaved rounds; ratio: median over rounds of transformers' step "
        "time / this one's. MFU counts useful FLOPs only (MLM decoder at the masked positions) for both, so "
        "transformers' vocab logits at unmasked positions are waste and show as lower MFU. compile s: "
        "warm-up time beyond settled steps. Rounds used (clean of other processes / all): "
        + ", ".join(f"{m} {used} ({c}/{meta['rounds']} clean)" for m, used, c in sorted(clean))
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,mini", help="comma-separated presets of bert.model.PRESETS")
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds after warm-up")
    p.add_argument("--steps", type=int, default=1, help="steps per implementation per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation")
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="also time ours after model.compile()")
    p.add_argument(
        "--tune-malloc",
        action="store_true",
        help="mallopt: keep big buffers in the heap instead of mmap/munmap per step (affects all impls)",
    )
    p.add_argument("--peak-size", type=int, default=2048, help="matrix size for the fp32 matmul peak")
    p.add_argument(
        "--max-wait", type=float, default=30.0, help="seconds to wait for idle cores before a measurement"
    )
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        help="re-takes of a measurement that saw other processes on the cores",
    )
    p.add_argument(
        "--max-runqueue",
        type=float,
        default=0.03,
        help="a measurement whose threads waited for a CPU more than this fraction of its time is re-taken",
    )
    p.add_argument(
        "--busy-ms", type=float, default=1.0, help="contention probe threshold (4 MiB parallel add, ms)"
    )
    p.add_argument(
        "--cold-compile", action="store_true", help="fresh inductor cache dir, so compile s is a cold compile"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--precision", default="32-true", help="32-true, or bf16-mixed (autocast, as Lightning's precision)"
    )
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny only, 2 rounds of 1 step")
    p.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.rounds, args.steps, args.warmup, args.peak_size = "tiny", 2, 1, 1, 1024
        args.max_wait, args.retries = min(args.max_wait, 2.0), 0
    on_gpu = args.device != "cpu"
    if on_gpu:  # the probe measures the CPU cores: no waiting, no re-takes on a GPU machine
        args.max_wait, args.retries, args.max_runqueue = 0.0, 0, math.inf
        if args.peak_size == 2048:
            args.peak_size = 8192  # a 2048^3 product is too small to reach a GPU's peak
    peak_dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    if args.cold_compile:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_cold_")

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    malloc_tuned = tune_malloc() if args.tune_malloc else False
    threads = torch.get_num_threads()
    log(f"torch {torch.__version__}, {threads} threads (torch default, left as is)")
    probe = ContentionProbe(args.busy_ms)

    def measure_peak() -> float:
        probe.wait(args.max_wait)
        return matmul_peak(args.peak_size, 3 if args.quick else 10, args.device, peak_dtype)

    peak = measure_peak()
    dtype_name = str(peak_dtype).removeprefix("torch.")
    log(f"{dtype_name} matmul peak: {peak / 1e9:.0f} GFLOP/s ({args.peak_size}^3 torch.mm, best of runs)")
    rows: list[dict] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows += bench_model(name, args, peak, probe, log)
    peak = max(peak, measure_peak())  # again after the models; MFU against the best seen in the run

    import transformers

    for r in rows:
        r["mfu"] = r["tflops"] * 1e12 / peak
    meta = {
        "vocab": args.vocab,
        "seq": args.seq,
        "batch": args.batch,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "warmup": args.warmup,
        "threads": threads,
        "device": torch.cuda.get_device_name(args.device) if on_gpu else "cpu",
        "precision": args.precision,
        "peak_dtype": dtype_name,
        "peak_gflops": peak / 1e9,
        "malloc_tuned": malloc_tuned,
        "cold_compile": args.cold_compile,
        "contention_check": "run-queue wait + probe" if probe.has_schedstat else "probe",
        "max_runqueue": args.max_runqueue,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
    }
    print_table(rows, meta)
    result = {"meta": meta, "results": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
