"""Measure the model step alone: ms/image by batch size and inference path, against the CPU's limit.

Each inference path runs in its own process (oneDNN reads its floating-point mode once, at start):

- ``ov-float32``: what the app serves by default (aisight.predictor, backend OpenVINO): the
  artifact's OpenVINO IR, float32;
- ``ov-bf16``: the same with ``AISIGHT_PRECISION=bf16`` (OpenVINO computes in bf16 on AMX);
- ``tf-float32``, ``tf-bf16``: the app with ``AISIGHT_BACKEND=tensorflow``: TensorFlow's frozen graph,
  float32 or under Keras' ``mixed_bfloat16``;
- ``tf-float32-traced``, ``tf-bf16-traced``: the same before freezing (``AISIGHT_FREEZE=off``): a traced
  ``tf.function`` with the weights as variables;
- ``bf16-onednn``: the float32 traced function with oneDNN told to compute in bf16 (AMX), fp32 in memory;
- ``xla``: the float32 traced function with ``jit_compile=True``;
- ``predict``: ``model.predict(x)`` per call, the paper's way.

The floating-point limit is given twice: the theoretical peak of the cores (FP32 AVX-512 FMA, and AMX
BF16 where present) and the practical ceiling: the best of a large matmul and a large 1x1 convolution
through the same oneDNN kernels, on this machine.

    PYTHONPATH=. .venv/bin/python bench/model_step.py [--model DIR] [--paths ov-bf16,tf-bf16] [--batches 1,8,32]

Without ``--model`` it builds (once, cached) an Xception artifact with the paper's head and random
weights: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CACHE = Path(os.environ.get("AISIGHT_BENCH_CACHE", Path(tempfile.gettempdir()) / "aisight-bench"))
PATHS = ("ov-float32", "ov-bf16", "tf-float32", "tf-bf16", "tf-float32-traced", "tf-bf16-traced", "bf16-onednn", "xla",
         "predict")
DEFAULT_PATHS = ("ov-float32", "ov-bf16", "tf-float32", "tf-bf16", "predict")
# Paths that differ only by the environment their process starts with.
PATH_ENV = {"bf16-onednn": {"ONEDNN_DEFAULT_FPMATH_MODE": "BF16"}}
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32)


# --- The model under test ---------------------------------------------------------------------------


def xception_artifact(cache: Path = CACHE) -> Path:
    """Return a folder with Xception + the paper's head (Flatten, Dropout, Dense 2), building it once."""
    out = cache / "xception-flatten"
    if (out / "model.keras").is_file() and (out / "model_card.json").is_file():
        if not (out / "model.xml").is_file():  # cached by an older version of this script
            _add_ir(out)
        return out
    print(f"building the Xception benchmark artifact in {out} (once)...", file=sys.stderr, flush=True)
    code = (
        "import sys\n"
        "from training.models import build_model\n"
        "from training.export import export_artifact\n"
        "m = build_model('Xception', weights='none', head='flatten')\n"
        "export_artifact(m, sys.argv[1], {'name': 'bench-xception', 'version': 'random-weights',"
        " 'architecture': 'Xception', 'warning': 'Random weights: for speed measurements only.'})\n"
    )
    tmp = cache / "xception-flatten.tmp"
    subprocess.run([sys.executable, "-c", code, str(tmp)], check=True, cwd=ROOT, env=_env())
    _add_ir(tmp)
    tmp.rename(out)
    return out


def _add_ir(model_dir: Path) -> None:
    """Give the artifact its OpenVINO IR, as `python -m training export-openvino` does."""
    subprocess.run([sys.executable, "-m", "training", "export-openvino", "--model", str(model_dir)], check=True,
                   cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL)


def model_dir_arg(value: str | None) -> Path:
    """``--model``: a given artifact folder, or the cached Xception one."""
    return Path(value) if value else xception_artifact()


def count_flops(model) -> int:
    """Floating-point operations of one image's forward pass (a multiply-add is 2), from layer shapes.

    Convolutions and dense layers only: batch-norm, activations, pooling and adds are a fraction of a
    percent of Xception's work (and batch-norm is folded into the convolutions at inference).
    """
    import keras

    total = 0
    for layer in model.layers:
        kinds = (keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D, keras.layers.Conv2D, keras.layers.Dense)
        if not isinstance(layer, kinds):
            continue  # adds and concatenations have several inputs and no multiply-adds worth counting
        out_shape, in_shape = layer.output.shape, layer.input.shape
        if isinstance(layer, keras.layers.SeparableConv2D):
            kh, kw = layer.kernel_size
            h, w, cin, cout = out_shape[1], out_shape[2], in_shape[-1], out_shape[-1]
            total += 2 * h * w * cin * kh * kw * layer.depth_multiplier  # depthwise
            total += 2 * h * w * cin * layer.depth_multiplier * cout  # pointwise
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw = layer.kernel_size
            total += 2 * out_shape[1] * out_shape[2] * in_shape[-1] * kh * kw * layer.depth_multiplier
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            total += 2 * out_shape[1] * out_shape[2] * out_shape[-1] * in_shape[-1] * kh * kw
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * int(np.prod(in_shape[1:])) * out_shape[-1]
    return int(total)


# --- The machine's limit ----------------------------------------------------------------------------


def cpu_info() -> dict:
    """Cores, clock and vector units of this CPU, and its theoretical FP32 and AMX-BF16 peaks (GFLOP/s)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags: set[str] = set()
    model, mhz = "unknown", 0.0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "cpu MHz" and not mhz:
            mhz = float(value)
    ghz = mhz / 1000 if mhz else 2.0
    # FP32 FLOP per cycle per core: 2 FMA units x vector lanes x 2 (multiply + add). Server cores with
    # AVX-512 (Xeon Gold/Platinum) have two 512-bit FMA units; AVX2-only cores two 256-bit ones.
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fp32_per_cycle = 2 * lanes * 2
    # AMX: one TDPBF16PS does 16x16x32 multiply-adds in 16 cycles, i.e. 1024 BF16 FLOP per cycle per core.
    amx_per_cycle = 1024 if "amx_bf16" in flags else 0
    return {
        "model": model,
        "cores": cores,
        "ghz": round(ghz, 3),
        "avx512": "avx512f" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "fp32_peak_gflops": cores * ghz * fp32_per_cycle,
        "bf16_amx_peak_gflops": cores * ghz * amx_per_cycle,
    }


_FMA_C = r"""
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(void) {
    long n = 200000000;
    double t0 = now();
    /* 10 independent AVX-512 FMA chains in registers: more than the 2 units x 4 cycles latency. */
    __asm__ volatile(
        "vxorps %%zmm10, %%zmm10, %%zmm10\n\t"
        "vxorps %%zmm11, %%zmm11, %%zmm11\n\t"
        "mov %0, %%rcx\n\t"
        "1:\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm0\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm1\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm2\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm3\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm4\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm5\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm6\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm7\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm8\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm9\n\t"
        "dec %%rcx\n\t"
        "jnz 1b\n\t"
        : : "r"(n) : "rcx", "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9",
          "zmm10", "zmm11", "cc");
    double t = now() - t0;
    printf("%f\n", 2.0 * 16 * 10 * n / t / 1e9);
    return 0;
}
"""


def fma_peak() -> float | None:
    """FP32 GFLOP/s of AVX-512 FMAs on every core at once (a tiny C program), or None without gcc/AVX-512.

    The clock /proc/cpuinfo gives in a VM is the nominal one; under load the cores turbo above it, so
    this is the honest FP32 limit of the machine.
    """
    import shutil

    if not shutil.which("gcc") or not cpu_info()["avx512"]:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "fma.c", Path(tmp) / "fma"
        src.write_text(_FMA_C)
        if subprocess.run(["gcc", "-O2", str(src), "-o", str(exe)], capture_output=True).returncode != 0:
            return None
        procs = [subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True) for _ in range(cpu_info()["cores"])]
        return sum(float(p.communicate()[0]) for p in procs)


def matmul_ceiling(dtype: str, seconds: float = 2.0) -> float:
    """GFLOP/s of the best of a large matmul and a large 1x1 convolution in ``dtype``: the practical ceiling.

    Both run through TensorFlow's oneDNN kernels (AMX for bf16 where present), as the model does.
    """
    import tensorflow as tf

    dt = tf.bfloat16 if dtype == "bf16" else tf.float32
    n = 2048
    a, b = tf.cast(tf.random.normal((n, n)), dt), tf.cast(tf.random.normal((n, n)), dt)
    x, w = tf.cast(tf.random.normal((32, 32, 32, 1024)), dt), tf.cast(tf.random.normal((1, 1, 1024, 1024)), dt)
    cases = [
        (tf.function(lambda: tf.matmul(a, b)), 2 * n**3),
        (tf.function(lambda: tf.nn.conv2d(x, w, 1, "SAME")), 2 * 32 * 32 * 32 * 1024 * 1024),
    ]
    best = 0.0
    for step, flops in cases:
        step().numpy()
        times = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 3:
            t = time.perf_counter()
            step().numpy()
            times.append(time.perf_counter() - t)
        best = max(best, flops / min(times) / 1e9)
    return best


# --- One path, in this process ----------------------------------------------------------------------


def build_step(path: str, model_dir: Path):
    """Return (run(batch uint8) -> probs, float32 model) for one inference path."""
    from aisight.artifact import load_model

    if path.startswith(("ov-", "tf-")):
        from aisight.predictor import Predictor

        backend, precision, traced = (path.split("-") + [""])[:3]
        # max_batch=1: no micro-batcher and no padding, so each batch size runs as it is.
        p = Predictor(model_dir, max_batch=1, precision=precision, freeze="off" if traced else "sync",
                      backend="openvino" if backend == "ov" else "tensorflow").load()
        if not p.ready:
            raise RuntimeError(p.error)
        graph = "openvino" if backend == "ov" else "traced" if traced else "frozen"
        if p.graph != graph or p.precision != precision:
            raise RuntimeError(f"{path}: got the {p.graph} graph in {p.precision}")
        return p.predict, p.explain_model()
    model = load_model(model_dir)
    if path == "predict":
        return (lambda x: model.predict(x.astype(np.float32), verbose=0)[:, 1]), model
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False), jit_compile=path == "xla")
    return (lambda x: fn(tf.constant(x, tf.float32)).numpy()[:, 1]), model


def time_batches(run, batches: list[int], seconds: float, seed: int = 0) -> list[dict]:
    """Median seconds per call for each batch size, after warm-up calls (first-call cost reported apart)."""
    rng = np.random.default_rng(seed)
    rows = []
    for bs in batches:
        x = rng.integers(0, 256, (bs, 128, 128, 3), dtype=np.uint8)
        t = time.perf_counter()
        run(x)
        first = time.perf_counter() - t
        run(x)
        times = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 3:
            t = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        rows.append({"batch": bs, "first_s": first, "median_s": med, "best_s": min(times), "reps": len(times)})
        print(f"  batch {bs:>3}: {med / bs * 1000:8.1f} ms/img (first call {first * 1000:.0f} ms)", file=sys.stderr,
              flush=True)
    return rows


def worker(path: str, model_dir: Path, batches: list[int], seconds: float, ceilings: bool) -> dict:
    """Measure one path in this process and return its numbers."""
    t = time.perf_counter()
    run, model = build_step(path, model_dir)
    load_s = time.perf_counter() - t
    out = {"path": path, "load_s": load_s, "flops": count_flops(model), "rows": time_batches(run, batches, seconds)}
    if ceilings:
        out["matmul_fp32_gflops"] = matmul_ceiling("fp32")
        out["matmul_bf16_gflops"] = matmul_ceiling("bf16")
    return out


# --- Driver -----------------------------------------------------------------------------------------


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **(extra or {})}
    return env


def run_paths(model_dir: Path, paths: list[str], batches: list[int], seconds: float) -> dict:
    """Measure each path in a fresh process; the first one also measures the matmul ceilings."""
    results = {"cpu": cpu_info(), "model_dir": str(model_dir), "paths": [], "fma_peak_gflops": fma_peak()}
    for i, path in enumerate(paths):
        print(f"model step: {path}", file=sys.stderr, flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", path, "--model", str(model_dir),
               "--batches", ",".join(map(str, batches)), "--seconds", str(seconds)]
        if i == 0:
            cmd.append("--ceilings")
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(PATH_ENV.get(path)), stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            print(f"  {path} failed (exit {proc.returncode})", file=sys.stderr)
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        for key in ("matmul_fp32_gflops", "matmul_bf16_gflops"):
            if key in res:
                results[key] = res.pop(key)
        results["paths"].append(res)
    return results


def summarize(results: dict) -> list[dict]:
    """One row per path: ms/img at batch 1 and at its best batch, GFLOP/s and % of each limit."""
    cpu = results["cpu"]
    fp32_peak, bf16_peak = limits(results)
    rows = []
    for res in results["paths"]:
        per_img = {r["batch"]: r["median_s"] / r["batch"] for r in res["rows"]}
        best_batch = min(per_img, key=per_img.get)
        gflops = res["flops"] / per_img[best_batch] / 1e9
        bf16 = "bf16" in res["path"]
        peak = bf16_peak if bf16 and cpu["amx_bf16"] else fp32_peak
        ceiling = results.get("matmul_bf16_gflops" if bf16 else "matmul_fp32_gflops")
        rows.append({
            "path": res["path"],
            "gflop_per_img": res["flops"] / 1e9,
            "ms_batch1": per_img.get(1, float("nan")) * 1000,
            "best_batch": best_batch,
            "ms_best": per_img[best_batch] * 1000,
            "gflops": gflops,
            "peak_gflops": peak,
            "pct_peak": 100 * gflops / peak if peak else float("nan"),
            "ceiling_gflops": ceiling or float("nan"),
            "pct_ceiling": 100 * gflops / ceiling if ceiling else float("nan"),
            "pct_fp32_peak": 100 * gflops / fp32_peak,
        })
    return rows


def limits(results: dict) -> tuple[float, float]:
    """FP32 and BF16 (AMX) peaks in GFLOP/s: from the measured FMA rate when there is one.

    The measured FMA rate gives the real clock (FMA rate / 64 FLOP per cycle per core); the AMX peak is
    1024 FLOP per cycle per core at that clock.
    """
    cpu = results["cpu"]
    fma = results.get("fma_peak_gflops")
    if not fma:
        return cpu["fp32_peak_gflops"], cpu["bf16_amx_peak_gflops"]
    ghz = fma / (64 * cpu["cores"])
    return fma, (cpu["cores"] * ghz * 1024 if cpu["amx_bf16"] else 0.0)


def markdown(results: dict) -> str:
    """The model-step table as Markdown."""
    cpu = results["cpu"]
    fp32_peak, bf16_peak = limits(results)
    measured = results.get("fma_peak_gflops")
    clock = (f"measured AVX-512 FMA rate {measured:.0f} GFLOP/s, i.e. {measured / (64 * cpu['cores']):.2f} GHz "
             f"under load" if measured else "no FMA measurement (gcc missing): nominal clock used")
    lines = [
        f"CPU: {cpu['model']}, {cpu['cores']} cores, nominal {cpu['ghz']} GHz ({clock}); peak FP32 (2 AVX-512 "
        f"FMA units) {fp32_peak:.0f} GFLOP/s, BF16 (AMX, 1024 FLOP/cycle/core) {bf16_peak:.0f} GFLOP/s; "
        f"measured ceiling (best of a 2048x2048 matmul and a 1x1 convolution) FP32 "
        f"{results.get('matmul_fp32_gflops', float('nan')):.0f} GFLOP/s, "
        f"BF16 {results.get('matmul_bf16_gflops', float('nan')):.0f} GFLOP/s.",
        "",
        "| path | ms/img, batch 1 | best batch | ms/img at best | GFLOP/s | % of peak (its precision) "
        "| % of FP32 peak | % of measured ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summarize(results):
        lines.append(
            f"| {r['path']} | {r['ms_batch1']:.1f} | {r['best_batch']} | {r['ms_best']:.1f} | {r['gflops']:.0f} "
            f"| {r['pct_peak']:.1f}% | {r['pct_fp32_peak']:.1f}% | {r['pct_ceiling']:.0f}% |"
        )
    if results["paths"]:
        lines.append("")
        lines.append(f"Work per image: {results['paths'][0]['flops'] / 1e9:.2f} GFLOP (convolutions and dense layers).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model artifact folder (default: a cached random-weight Xception)")
    ap.add_argument("--paths", default=",".join(DEFAULT_PATHS), help=f"comma-separated, from {', '.join(PATHS)}")
    ap.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)))
    ap.add_argument("--seconds", type=float, default=4.0, help="time per batch size (median of the calls)")
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    ap.add_argument("--ceilings", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    model_dir = model_dir_arg(args.model)
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, model_dir, batches, args.seconds, args.ceilings)))
        return 0
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(paths) - set(PATHS)
    if unknown:
        ap.error(f"unknown paths {sorted(unknown)}; choose from {PATHS}")
    results = run_paths(model_dir, paths, batches, args.seconds)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
