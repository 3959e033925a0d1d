"""Qwen3.5's gated delta nets on the CPU engine: against transformers (prefill and step by step,
value heads grouped unevenly), their states kept across steps and taken back by a rewind (to the
last prefill's end, or to 0) as a fresh prefill would compute them, on ONNX Runtime and with the
native C decode, and export.json's delta_net read as untrusted input; Granite 4.0-H's Mamba-2 mixers
(the same frame, rule mamba2) with their dt limits biting, and its hostile configs. (Every family's
tiny model, Qwen3.5's with one delta net, Granite 4.0-H's with one Mamba-2, is in
test_export_families.py; their quantizer groups in test_quantize.py; the native C decode against
ONNX Runtime in test_cpu_native.py; the cuda backend's kernels against the reference executor in
test_kernels_on_cpu.py, the reference executor against ONNX Runtime in test_native_engine.py.)"""
from __future__ import annotations

import numpy as np
import pytest

from awq_edge.backend_ort import OrtBackend
from awq_edge.engine_dir import read_export_info
from awq_edge.errors import UserError
from folder_helpers import edit_json, linked_copy
from test_export_helpers import TINY, TINY_EXTRA, check_against_reference, export_for_cpu, tiny_checkpoint

# two delta nets around an attention layer: one key head of 16 serving three value heads of 8, a kernel of 3;
# attention heads of 64 (the native C decode's smallest)
LAYERS = dict(num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"], head_dim=64,
              linear_num_key_heads=1, linear_num_value_heads=3, linear_key_head_dim=16, linear_value_head_dim=8,
              linear_conv_kernel_dim=3)


@pytest.fixture(scope="module")
def qwen3_5(tmp_path_factory, smollm2_dir):
    """(root, checkpoint, ort export) of that tiny Qwen3.5."""
    root = tmp_path_factory.mktemp("qwen3_5")
    ckpt = tiny_checkpoint(root, "qwen3_5_text", smollm2_dir, **LAYERS)
    return root, ckpt, export_for_cpu(ckpt, root / "exports", "ort")


def ids(n: int, seed: int = 5) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def test_a_qwen3_5_with_uneven_value_heads_matches_transformers(qwen3_5):
    """A prompt longer than transformers' chunks of 64 (its prefill's chunked form), then steps."""
    from awq_edge.checkpoint import load_awq_as_float

    root, ckpt, export = qwen3_5
    assert read_export_info(export).delta_layers == (0, 2)
    check_against_reference(export, load_awq_as_float(ckpt).eval(), ids(80), 70, 1e-5)


def test_a_qwen3_5_prompt_in_chunks_and_at_once_matches_transformers(tmp_path, smollm2_dir):
    """A prompt of 300 fed as the engine feeds it, 256 tokens (PREFILL_CHUNK) and then 44 onto the state they
    left, then steps; and fed at once. Each within 1e-5 of transformers."""
    from awq_edge.checkpoint import load_awq_as_float
    from awq_edge.memory import PREFILL_CHUNK
    from test_export_helpers import reference_logits, rel_err

    ckpt = tiny_checkpoint(tmp_path, "qwen3_5_text", smollm2_dir, **LAYERS, max_position_embeddings=512)
    export = export_for_cpu(ckpt, tmp_path / "exports", "ort")
    long = ids(303)
    want = reference_logits(load_awq_as_float(ckpt).eval(), long)[299:]
    chunked, whole = OrtBackend(export, max_context=512), OrtBackend(export, max_context=512)
    chunked.forward(long[:PREFILL_CHUNK])
    got = [chunked.forward(long[PREFILL_CHUNK:300]), *(chunked.forward([token]) for token in long[300:])]
    assert max(rel_err(g, w) for g, w in zip(got, want)) < 1e-5
    assert rel_err(whole.forward(long[:300]), want[0]) < 1e-5


def test_a_rewind_goes_back_to_the_last_prefills_end_or_to_0_and_feeds_on_as_before(qwen3_5):
    """The states cannot be taken back token by token: a rewind past the last prefill's end stops there,
    one before it goes to 0; what is fed again gives the first run's logits."""
    tokens = ids(24)
    backend = OrtBackend(qwen3_5[2], max_context=32)
    first = [backend.forward(tokens[:8])] + [backend.forward([t]) for t in tokens[8:16]]
    backend.rewind(12)
    assert backend.position == 8
    again = [backend.forward([t]) for t in tokens[8:16]]
    np.testing.assert_allclose(np.array(again), np.array(first[1:]), rtol=0, atol=1e-6 * np.abs(first).max())
    backend.rewind(5)
    assert backend.position == 0
    for start in range(0, 16, 3):  # chunks that cross the convolution's kernel of 3 at every boundary
        chunked = backend.forward(tokens[start:min(start + 3, 16)])
    np.testing.assert_allclose(chunked, first[-1], rtol=0, atol=1e-5 * np.abs(first[-1]).max())
    backend.rewind(backend.position)  # (nothing to take back: the states stay)
    assert backend.position == 16


def test_an_engine_asked_twice_and_in_a_chat_answers_as_a_fresh_one(qwen3_5, tmp_path):
    """A built engine (the native C decode, updating ONNX Runtime's state arrays in place) keeps what its
    backend kept (Engine._prefill): the same prompt again (fed from 0), a longer one that starts with the
    first and its reply (fed from the first prompt's end, a chat's next turn) give what a fresh engine
    gives."""
    from awq_edge.build import build_engine
    from awq_edge.engine import Engine
    from awq_edge.sampling import Sampler, SamplingSettings

    path = tmp_path / "engine"
    build_engine(str(qwen3_5[1]), "cpu", path, progress=False)

    def reply(engine, prompt):
        list(engine.stream_ids(prompt, Sampler(SamplingSettings(0.0)), 6, ignore_eos=True, reuse_cache=True,
                               logprobs=0))
        return [token for token, _, _ in engine.last_logprobs], [p for _, p, _ in engine.last_logprobs]

    engine = Engine.load(path, native_decode=True)
    assert engine.backend.decode_path.startswith("native"), engine.backend.decode_path
    prompt = ids(20, seed=9)
    first, again = reply(engine, prompt), reply(engine, prompt)
    longer = prompt + first[0] + ids(5, seed=11)
    reused, fresh = reply(engine, longer), reply(Engine.load(path, native_decode=True), longer)
    for a, b in ((first, again), (reused, fresh)):
        assert a[0] == b[0]
        np.testing.assert_allclose(a[1], b[1], atol=1e-4)


def test_a_text_checkpoint_that_keeps_the_vision_language_prefix_reads_as_ours(qwen3_5, tmp_path):
    """A text-only Qwen3.5 checkpoint named model.language_model.* (as taken out of its wrapper; transformers
    reads it so) holds the same model."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from awq_edge.checkpoint import read_for_engine

    ckpt = qwen3_5[1]
    prefixed = shutil.copytree(ckpt, tmp_path / "prefixed")
    tensors = load_file(ckpt / "model.safetensors")
    save_file({k.replace("model.", "model.language_model.", 1): v for k, v in tensors.items()},
              prefixed / "model.safetensors", metadata={"format": "pt"})
    (ours, _), (theirs, _) = read_for_engine(ckpt), read_for_engine(prefixed)
    assert sorted(ours.tensors) == sorted(theirs.tensors) and sorted(ours.linears) == sorted(theirs.linears)
    for name in ours.tensors:
        np.testing.assert_array_equal(ours.tensors[name], theirs.tensors[name])


def test_a_qwen3_5_whose_every_layer_is_attention_keeps_no_state():
    from awq_edge.export.spec import model_spec

    config = {**TINY, **TINY_EXTRA["qwen3_5_text"], "model_type": "qwen3_5_text"}
    assert model_spec({**config, "layer_types": ["full_attention"] * 2}).delta is None
    assert model_spec(config).delta.layers == (0,)


def test_the_cuda_backend_refuses_delta_net_heads_wider_than_its_kernel_takes():
    from awq_edge.decoder import decoder_spec
    from awq_edge.export.spec import model_spec

    config = {**TINY, **TINY_EXTRA["qwen3_5_text"], "model_type": "qwen3_5_text", "linear_value_head_dim": 512}
    with pytest.raises(UserError, match=r"delta-net heads \(8 and 512 wide\) are wider than the cuda backend's"):
        decoder_spec(model_spec(config), 32)


@pytest.mark.parametrize("config, message", [
    ({"layer_types": ["linear_attention", "bogus"]}, "layer_types must list full_attention or sliding_attention"),
    ({"layer_types": ["linear_attention"] * 2}, "every layer is a gated delta net"),
    ({"layer_types": None, "full_attention_interval": 5}, "every layer is a gated delta net"),
    ({"linear_num_value_heads": 3}, "linear_num_value_heads 3 is not a multiple of linear_num_key_heads 2"),
    ({"linear_conv_kernel_dim": 1 << 20}, "linear_conv_kernel_dim must be an integer in 2..16"),
    ({"linear_value_head_dim": 1024, "linear_key_head_dim": 1024, "linear_num_value_heads": 512},
     "state .* out of range"),
    ({"attention_bias": True}, "attention_bias True .* is not supported for qwen3_5_text"),
], ids=["an unknown layer", "no attention", "no attention (interval)", "heads that do not group", "a huge kernel",
        "a huge state", "biases"])
def test_a_hostile_qwen3_5_config_is_refused_in_one_line(config, message):
    from awq_edge.export.spec import model_spec

    with pytest.raises(UserError, match=message) as e:
        model_spec({**TINY, **TINY_EXTRA["qwen3_5_text"], "model_type": "qwen3_5_text", **config})
    assert "\n" not in str(e.value)


def test_a_granite4_h_whose_time_step_limit_bites_matches_transformers(tmp_path, smollm2_dir):
    """Mamba-2 mixers (four heads to each of two groups) around attention, dt held within 0.05..0.3 (transformers'
    one full forward clamps it, as the engine does at every step), a convolution of 3 with its bias; a prompt of
    300 fed as the engine feeds it, 256 tokens (PREFILL_CHUNK) and then 44 onto the state they left (the graph
    computes a step's tokens at once, mamba_chunk; transformers' chunks are 256 too, mamba_chunk_size)."""
    from awq_edge.checkpoint import load_awq_as_float
    from awq_edge.memory import PREFILL_CHUNK
    from test_export_helpers import reference_logits, rel_err

    ckpt = tiny_checkpoint(tmp_path, "granitemoehybrid", smollm2_dir, num_hidden_layers=3, mamba_n_heads=8,
                           mamba_n_groups=2, mamba_d_state=24, mamba_d_conv=3, time_step_limit=[0.05, 0.3],
                           layer_types=["mamba", "attention", "mamba"], max_position_embeddings=512)
    export = export_for_cpu(ckpt, tmp_path / "exports", "ort")
    delta = read_export_info(export).delta_net
    assert (delta.layers, delta.rule, delta.dt_min, delta.dt_max, delta.conv_bias) == ((0, 2), "mamba2", 0.05, 0.3,
                                                                                       True)
    reference = load_awq_as_float(ckpt).eval()
    check_against_reference(export, reference, ids(40), 20, 1e-5)
    long, backend = ids(303), OrtBackend(export, max_context=512)
    backend.forward(long[:PREFILL_CHUNK])
    got = [backend.forward(long[PREFILL_CHUNK:300]), *(backend.forward([token]) for token in long[300:])]
    want = reference_logits(reference, long)[299:]
    assert max(rel_err(g, w) for g, w in zip(got, want)) < 1e-5


@pytest.mark.parametrize("config, message", [
    ({"layer_types": ["mamba"] * 2}, "every layer is a Mamba-2 mixer"),
    ({"mamba_n_heads": 6}, "mamba_n_heads 6 x mamba_d_head 21 is not mamba_expand x hidden_size 128"),
    ({"mamba_n_groups": 3}, "not a multiple of mamba_n_groups 3"),
    ({"mamba_n_heads": 4}, "in_proj has 324 rows, not a multiple of 8"),
    ({"time_step_limit": [0.5, 0.1]}, "time_step_limit must be two numbers, low <= high"),
    ({"time_step_limit": "fast"}, "time_step_limit must be two numbers"),
    ({"mamba_d_state": 1 << 20}, "mamba_d_state must be an integer"),
    ({"mamba_proj_bias": True}, "mamba_proj_bias True .* is not supported for granitemoehybrid"),
], ids=["no attention", "heads that do not divide", "groups that do not divide", "rows not packable",
        "a limit upside down", "a limit not numbers", "a huge state", "biases"])
def test_a_hostile_granite4_h_config_is_refused_in_one_line(config, message):
    from awq_edge.export.spec import model_spec

    with pytest.raises(UserError, match=message) as e:
        model_spec({**TINY, **TINY_EXTRA["granitemoehybrid"], "model_type": "granitemoehybrid", **config})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (lambda i: i["delta_net"].update(layers=[0, 0]), "delta_net layers must list distinct layer numbers below 3"),
    (lambda i: i["delta_net"].update(layers=[0, 1, 2]), "not all of them"),
    (lambda i: i["delta_net"].update(layers=[0, True]), "delta_net layers must list"),
    (lambda i: i["delta_net"].update(k_heads=2), "do not group"),
    (lambda i: i["delta_net"].update(k_dim=1 << 30), "k_dim must be an integer"),
    (lambda i: i["delta_net"].update(k_dim=1024, v_dim=1024, v_heads=300), "over 1024 MiB a layer"),
    (lambda i: i["delta_net"].update(kernel=4), "the graph's inputs do not have|does not have the type and shape"),
    (lambda i: i["delta_net"].update(rule="mamba3"), "rule must be one of gated, mamba2"),
    (lambda i: i["delta_net"].update(dt_min=0.5, dt_max=0.1), "dt_max is below dt_min"),
    # (K and V counted for a delta layer: the byte count or the graph's inputs tell)
    (lambda i: i.pop("delta_net"), "kv_bytes_per_token"),
], ids=["twice", "every layer", "a bool", "heads that do not group", "a huge head", "a huge state", "another kernel",
        "another rule", "dt limits upside down", "left out"])
def test_delta_net_in_export_json_is_checked(qwen3_5, tmp_path, edit, message):
    export = linked_copy(qwen3_5[2], tmp_path / "e")
    edit_json(export / "export.json", edit)
    with pytest.raises(UserError, match=message) as e:
        read_export_info(export)
    assert "\n" not in str(e.value)
