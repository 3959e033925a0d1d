"""Decode attention that reads each KV head once, built from ONNX Runtime ops, against
GroupQueryAttention (what the ort engine and onnxruntime-genai use), on the CPU.

    python benchmarks/cpu_attention_split.py [--contexts 64,192,512,1024] [--threads 2]

Why: ORT's CPU GroupQueryAttention runs one M=1 product per query head, so with grouped heads
(SmolLM2: 9 query heads on 3 KV heads) every KV head is read 3 times a step. The variant here
reads each once with a batched M = heads / kv_heads product per KV head:

    scores_past = FusedMatMul(q [Hkv, rep, D], K [Hkv, B, D], transB) + mask   (B: a 64-row bucket)
    scores_new  = FusedMatMul(q, k_new [Hkv, 1, D], transB)
    p = Softmax(Concat(scores_past, scores_new));  out = p_past @ V + p_new @ v_new

K/V live in one arena the host owns: [layers, 2, Hkv * max_context * D], each layer's K and V
viewed as a contiguous [Hkv, B, D] (rebound only when the context crosses a bucket), and the host
writes the step's new rows after the run (GroupQueryAttention writes them in place instead).
Both graphs are 30 layers of SmolLM2's shapes (no weights: attention only), RoPE included
(do_rotary in GQA, com.microsoft RotaryEmbedding in the variant). Outputs are checked equal,
then each is timed (median of 5 x 200 steps, in this process). Writes
benchmarks/results/cpu_attention_split-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64  # SmolLM2-135M
REP = HEADS // KV_HEADS
MAX_CONTEXT, BUCKET = 2048, 64
F32, I64 = TensorProto.FLOAT, TensorProto.INT64
SCALE = HEAD_DIM ** -0.5
RESULTS = Path(__file__).resolve().parent / "results"


def rope_tables():
    inv_freq = 1.0 / (10000 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    angles = np.arange(MAX_CONTEXT)[:, None] * inv_freq[None]
    return [helper.make_tensor(n, F32, t.shape, t.astype(np.float32).ravel())
            for n, t in (("cos", np.cos(angles)), ("sin", np.sin(angles)))]


def model(nodes, inputs, outputs, initializers):
    graph = helper.make_graph(nodes, "attention", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def gqa_graph() -> bytes:
    """Every layer: one GroupQueryAttention on the packed qkv, past and present sharing a buffer."""
    qkv_width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    inputs = [helper.make_tensor_value_info("qkv", F32, [1, 1, qkv_width]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    outputs, nodes = [helper.make_tensor_value_info("out", F32, [1, 1, HEADS * HEAD_DIM])], []
    for i in range(LAYERS):
        for kind in ("k", "v"):
            shape = [1, KV_HEADS, MAX_CONTEXT, HEAD_DIM]
            inputs.append(helper.make_tensor_value_info(f"past_{kind}{i}", F32, shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}{i}", F32, shape))
        nodes.append(helper.make_node(
            "GroupQueryAttention", ["qkv", "", "", f"past_k{i}", f"past_v{i}", "seqlens_k", "total", "cos", "sin"],
            [f"o{i}", f"present_k{i}", f"present_v{i}"], domain="com.microsoft", num_heads=HEADS,
            kv_num_heads=KV_HEADS, scale=SCALE, do_rotary=1, rotary_interleaved=0))
    nodes.append(helper.make_node("Concat", [f"o{i}" for i in range(LAYERS)], ["out"], axis=0))
    outputs[0] = helper.make_tensor_value_info("out", F32, [LAYERS, 1, HEADS * HEAD_DIM])
    return model(nodes, inputs, outputs, rope_tables())


def split_graph() -> bytes:
    """Every layer reads its K/V bucket once (module docstring); outputs the new rows to append."""
    q_width, kv_width = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    consts = rope_tables() + [
        helper.make_tensor("qkv_split", I64, [3], [q_width, kv_width, kv_width]),
        helper.make_tensor("q_shape", I64, [3], [KV_HEADS, REP, HEAD_DIM]),
        helper.make_tensor("kv_shape", I64, [3], [KV_HEADS, 1, HEAD_DIM]),
        helper.make_tensor("out_shape", I64, [3], [1, 1, q_width]),
        helper.make_tensor("one", I64, [1], [1]), helper.make_tensor("two", I64, [1], [2])]
    inputs = [helper.make_tensor_value_info("qkv", F32, [1, 1, q_width + 2 * kv_width]),
              helper.make_tensor_value_info("position", I64, [1, 1]),
              helper.make_tensor_value_info("mask", F32, [1, "bucket"])]
    # the softmax output splits into [bucket | 1]
    nodes = [helper.make_node("Shape", ["mask"], ["mask_shape"]),
             helper.make_node("Slice", ["mask_shape", "one", "two"], ["bucket"]),
             helper.make_node("Concat", ["bucket", "one"], ["p_split"], axis=0)]
    news = []
    for i in range(LAYERS):
        for kind in ("k", "v"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}{i}", F32, [KV_HEADS, "bucket", HEAD_DIM]))
        n = lambda s: f"{s}{i}"  # noqa: E731 (names of this layer)
        nodes += [
            helper.make_node("Split", ["qkv", "qkv_split"], [n("q"), n("k"), n("v")], axis=-1),
            helper.make_node("RotaryEmbedding", [n("q"), "position", "cos", "sin"], [n("qr")],
                             domain="com.microsoft", num_heads=HEADS),
            helper.make_node("RotaryEmbedding", [n("k"), "position", "cos", "sin"], [n("kr")],
                             domain="com.microsoft", num_heads=KV_HEADS),
            helper.make_node("Reshape", [n("qr"), "q_shape"], [n("q3")]),
            helper.make_node("Reshape", [n("kr"), "kv_shape"], [n("k3")]),
            helper.make_node("Reshape", [n("v"), "kv_shape"], [n("v3")]),
            helper.make_node("FusedMatMul", [n("q3"), n("past_k")], [n("s_past")], domain="com.microsoft",
                             transB=1, alpha=SCALE),
            helper.make_node("FusedMatMul", [n("q3"), n("k3")], [n("s_new")], domain="com.microsoft",
                             transB=1, alpha=SCALE),
            helper.make_node("Add", [n("s_past"), "mask"], [n("s_masked")]),
            helper.make_node("Concat", [n("s_masked"), n("s_new")], [n("s")], axis=-1),
            helper.make_node("Softmax", [n("s")], [n("p")], axis=-1),
            helper.make_node("Split", [n("p"), "p_split"], [n("p_past"), n("p_new")], axis=-1),
            helper.make_node("MatMul", [n("p_past"), n("past_v")], [n("o_past")]),
            helper.make_node("MatMul", [n("p_new"), n("v3")], [n("o_new")]),
            helper.make_node("Add", [n("o_past"), n("o_new")], [n("o_sum")]),
            helper.make_node("Reshape", [n("o_sum"), "out_shape"], [n("o")]),
        ]
        news += [n("kr"), n("v")]
    nodes += [helper.make_node("Concat", [f"o{i}" for i in range(LAYERS)], ["out"], axis=0),
              helper.make_node("Concat", news, ["new_kv"], axis=0)]
    outputs = [helper.make_tensor_value_info("out", F32, [LAYERS, 1, q_width]),
               helper.make_tensor_value_info("new_kv", F32, [2 * LAYERS, 1, kv_width])]
    return model(nodes, inputs, outputs, consts)


def session(graph: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()  # as the engine's backend_ort.session_options
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])


def median_ms(step, steps: int = 200, repeats: int = 5) -> float:
    for _ in range(20):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def compare(context: int, gqa: ort.InferenceSession, split: ort.InferenceSession, rng) -> dict:
    """Both graphs on the same cache of `context` rows and the same qkv: max |diff|, then ms per step."""
    qkv = rng.standard_normal((1, 1, (HEADS + 2 * KV_HEADS) * HEAD_DIM)).astype(np.float32)
    kv = rng.standard_normal((LAYERS, 2, KV_HEADS, context, HEAD_DIM)).astype(np.float32)

    caches = np.zeros((LAYERS, 2, 1, KV_HEADS, MAX_CONTEXT, HEAD_DIM), np.float32)
    caches[:, :, 0, :, :context] = kv
    gqa_binding = gqa.io_binding()
    for i in range(LAYERS):
        for j, kind in enumerate(("k", "v")):
            buf = ort.OrtValue.ortvalue_from_numpy(caches[i, j])
            gqa_binding.bind_ortvalue_input(f"past_{kind}{i}", buf)
            gqa_binding.bind_ortvalue_output(f"present_{kind}{i}", buf)
    gqa_binding.bind_cpu_input("qkv", qkv)
    gqa_binding.bind_cpu_input("seqlens_k", np.array([context], np.int32))
    gqa_binding.bind_cpu_input("total", np.array(context + 1, np.int32))
    gqa_binding.bind_output("out", "cpu")

    bucket = (context + BUCKET) // BUCKET * BUCKET  # rows 0..context: the new row fits
    arena = np.zeros((LAYERS, 2, KV_HEADS * MAX_CONTEXT * HEAD_DIM), np.float32)
    views = arena[:, :, :KV_HEADS * bucket * HEAD_DIM].reshape(LAYERS, 2, KV_HEADS, bucket, HEAD_DIM)
    views[:, :, :, :context] = kv
    mask = np.zeros((1, bucket), np.float32)
    mask[0, context:] = np.finfo(np.float32).min
    split_binding = split.io_binding()
    for i in range(LAYERS):
        for j, kind in enumerate(("k", "v")):
            split_binding.bind_ortvalue_input(f"past_{kind}{i}", ort.OrtValue.ortvalue_from_numpy(views[i, j]))
    split_binding.bind_cpu_input("qkv", qkv)
    split_binding.bind_cpu_input("position", np.array([[context]], np.int64))
    split_binding.bind_cpu_input("mask", mask)
    split_binding.bind_output("out", "cpu")
    split_binding.bind_output("new_kv", "cpu")

    def split_step():
        split.run_with_iobinding(split_binding)
        new_rows = split_binding.get_outputs()[1].numpy()
        views[:, :, :, context] = new_rows.reshape(LAYERS, 2, KV_HEADS, HEAD_DIM)  # the host appends

    gqa.run_with_iobinding(gqa_binding)
    split_step()
    gqa_out = gqa_binding.get_outputs()[-1].numpy()  # bound last
    split_out = split_binding.get_outputs()[0].numpy()
    diff = float(np.abs(gqa_out - split_out).max())
    same_rows = bool(np.allclose(caches[:, :, 0, :, context], views[:, :, :, context], atol=1e-5))
    if diff > 1e-4 or not same_rows:
        raise SystemExit(f"context {context}: the two graphs disagree (max |diff| {diff:.2e}, "
                         f"new rows equal: {same_rows}); the timing would compare different work")
    gqa_ms = median_ms(lambda: gqa.run_with_iobinding(gqa_binding))
    split_ms = median_ms(split_step)
    return {"context": context, "bucket": bucket, "max_abs_diff": diff, "gqa_ms": round(gqa_ms, 4),
            "split_ms": round(split_ms, 4), "gqa_over_split": round(gqa_ms / split_ms, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="64,192,512,1024")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if not all(1 <= c < MAX_CONTEXT for c in contexts):
        raise SystemExit(f"--contexts must each be 1..{MAX_CONTEXT - 1}")
    rng = np.random.default_rng(0)
    gqa, split = session(gqa_graph(), args.threads), session(split_graph(), args.threads)
    rows = []
    print(f"{LAYERS} layers, {HEADS} heads on {KV_HEADS} KV heads, D {HEAD_DIM}, {args.threads} threads, ms per step")
    for c in contexts:
        rows.append(compare(c, gqa, split, rng))
        r = rows[-1]
        print(f"context {c:5d}: GroupQueryAttention {r['gqa_ms']:.3f}  read-once split {r['split_ms']:.3f}  "
              f"(GQA / split {r['gqa_over_split']:.2f}; outputs agree to {r['max_abs_diff']:.1e})", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = {"command": "python benchmarks/cpu_attention_split.py --contexts " + args.contexts
              + f" --threads {args.threads}", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": platform.platform(), "logical_cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "onnxruntime": ort.__version__, "shapes": {"layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS,
                                                          "head_dim": HEAD_DIM, "bucket": BUCKET},
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"cpu_attention_split-{stamp}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
