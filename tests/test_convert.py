"""Hugging Face Llama interop: golden parity with transformers, exact round trips, bad input.

The golden fixtures (tests/fixtures/hf_tiny_llama_*) were written by scripts/make_hf_golden.py with
transformers' PyTorch LlamaForCausalLM (GQA: 4 heads, 2 kv heads; one with Llama-3.1 "llama3" RoPE
scaling); torch is not needed here.
"""

import json
import pathlib
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from lm2_jax.convert import load_hf_llama, save_hf_llama
from lm2_jax.convert.__main__ import main as cli_main
from lm2_jax.convert.__main__ import restore_checkpoint
from lm2_jax.convert.llama import MEMORY_FILE
from lm2_jax.convert.safetensors_io import SafetensorsCheckpoint, write_safetensors
from lm2_jax.model import LM2
from lm2_jax.train import checkpoint as train_checkpoint
from lm2_jax.train import optimizer as optimizer_lib
from lm2_jax.train import state as state_lib
from lm2_jax.train.config import CheckpointConfig, MeshConfig, TrainConfig
from lm2_jax.train.mesh import logical_shardings, make_mesh

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TIED = FIXTURES / "hf_tiny_llama_tied"
UNTIED = FIXTURES / "hf_tiny_llama_untied_sharded"
LLAMA3 = FIXTURES / "hf_tiny_llama_rope_llama3"
# The llama3 fixture's rope_parameters, as ModelConfig fields.
LLAMA3_FIELDS = {"rope_scaling_factor": 8.0, "rope_low_freq_factor": 2.0, "rope_high_freq_factor": 8.0,
                 "rope_original_max_position": 128}
# One 16-token segment: segment-local attention and RoPE positions 0..15 are then plain Llama's.
SEG = {"segment_length": 16}
MEMORY = {**SEG, "use_memory": True, "memory_layers": 1, "num_slots": 8, "memory_init": "learned"}


def _logits(cfg, variables, ids):
  logits, _ = jax.jit(LM2(cfg).apply)(variables, jnp.asarray(ids))
  return np.asarray(logits)


def _flat(variables):
  return traverse_util.flatten_dict(nn.meta.unbox(variables)["params"])


def _assert_params_equal(a, b):
  fa, fb = _flat(a), _flat(b)
  assert sorted(fa) == sorted(fb)
  for path in fa:
    assert fa[path].dtype == fb[path].dtype, path
    np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg=str(path))


def _hf_tensors(directory):
  ckpt = SafetensorsCheckpoint(directory)
  return {name: ckpt.read(name) for name in ckpt.names}


@pytest.mark.parametrize("hf_dir", [TIED, UNTIED, LLAMA3], ids=["tied", "untied_sharded", "llama3"])
@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_golden_logits_match_transformers(hf_dir, scan_layers):
  cfg, variables = load_hf_llama(hf_dir, scan_layers=scan_layers, **SEG)
  assert cfg.tie_embeddings == (hf_dir == TIED)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.use_memory) == (4, 2, False)
  assert ("lm_head" in variables["params"]) == (hf_dir != TIED)
  scaled = {name: getattr(cfg, name) for name in LLAMA3_FIELDS}
  assert (scaled == LLAMA3_FIELDS) == (hf_dir == LLAMA3)
  assert (cfg.rope_scaling_factor is None) == (hf_dir != LLAMA3)
  golden = np.load(hf_dir / "logits.npy")
  error = np.abs(_logits(cfg, variables, np.load(hf_dir / "input_ids.npy")) - golden).max()
  assert error <= 1e-4, error


def test_llama3_fixture_depends_on_the_rope_scaling(tmp_path):
  """Without the scaling the fixture's logits are far off, so the parity above checks the mapping;
  the transformers 4 spelling (rope_theta + rope_scaling) reads the same as rope_parameters."""
  ids, golden = np.load(LLAMA3 / "input_ids.npy"), np.load(LLAMA3 / "logits.npy")
  cfg, variables = load_hf_llama(LLAMA3, rope_scaling_factor=None, **SEG)
  assert np.abs(_logits(cfg, variables, ids) - golden).max() > 1e-3
  hf_dir = _copy(tmp_path, LLAMA3)
  config = json.loads((hf_dir / "config.json").read_text())
  rope = config.pop("rope_parameters")
  config["rope_theta"] = rope.pop("rope_theta")
  config["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
  (hf_dir / "config.json").write_text(json.dumps(config))
  cfg4, _ = load_hf_llama(hf_dir, **SEG)
  assert cfg4 == load_hf_llama(LLAMA3, **SEG)[0]
  assert cfg4.rope_theta == 10000.0 and cfg4.rope_scaling_factor == 8.0


def test_llama3_export_writes_both_spellings(tmp_path):
  cfg, variables = load_hf_llama(LLAMA3, **SEG)
  save_hf_llama(cfg, variables, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  expected = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
              "original_max_position_embeddings": 128}
  assert config["rope_scaling"] == expected
  assert config["rope_parameters"] == {**expected, "rope_theta": 10000.0}
  assert config["max_position_embeddings"] > 128  # transformers warns unless it exceeds the original
  config.pop("lm2_jax_config")  # read back from the HF keys alone
  (tmp_path / "config.json").write_text(json.dumps(config))
  assert load_hf_llama(tmp_path, **SEG)[0] == cfg
  original, exported = _hf_tensors(LLAMA3), _hf_tensors(tmp_path)
  assert sorted(original) == sorted(exported)
  for name, array in original.items():
    np.testing.assert_array_equal(exported[name], array, err_msg=name)


def test_golden_fixture_detects_a_wrong_mapping():
  """The fixture's weights are large enough that a plausible mapping mistake is far outside 1e-4."""
  cfg, variables = load_hf_llama(UNTIED, **SEG)
  ids, golden = np.load(UNTIED / "input_ids.npy"), np.load(UNTIED / "logits.npy")
  attn = variables["params"]["block_0"]["attn"]
  kernel = attn["k_proj"]["kernel"]                            # [D, K, H]
  attn["k_proj"]["kernel"] = kernel[:, ::-1]                   # kv heads swapped (a GQA grouping bug)
  assert np.abs(_logits(cfg, variables, ids) - golden).max() > 0.1
  attn["k_proj"]["kernel"] = kernel
  mlp = variables["params"]["block_1"]["mlp"]
  mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"] = (mlp["up_proj"]["kernel"],
                                                          mlp["gate_proj"]["kernel"])
  assert np.abs(_logits(cfg, variables, ids) - golden).max() > 0.1


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_hf_to_lm2_to_hf_is_exact(tmp_path, scan_layers):
  cfg, variables = load_hf_llama(UNTIED, scan_layers=scan_layers, **SEG)
  written = save_hf_llama(cfg, variables, tmp_path, max_shard_bytes=100_000)
  assert "model.safetensors.index.json" in written and MEMORY_FILE not in written
  original, exported = _hf_tensors(UNTIED), _hf_tensors(tmp_path)
  assert sorted(original) == sorted(exported)
  for name, array in original.items():
    np.testing.assert_array_equal(exported[name], array, err_msg=name)


def test_fresh_memory_params_are_those_of_a_full_init():
  """With use_memory and no memory file only the memory is initialised, as a full init would."""
  cfg, variables = load_hf_llama(TIED, rng=3, **MEMORY)
  full = _flat(jax.jit(LM2(cfg).init)(jax.random.key(3), jnp.zeros((1, 16), jnp.int32)))
  loaded = _flat(variables)
  memory = [p for p in loaded if p[0] == "memory_init" or "memory" in p[:2]]
  assert memory and len(memory) < len(loaded)
  for path in memory:
    np.testing.assert_array_equal(np.asarray(loaded[path]), np.asarray(full[path]))
  golden = _flat(load_hf_llama(TIED, **SEG)[1])
  for path in set(loaded) - set(memory):
    np.testing.assert_array_equal(np.asarray(loaded[path]), np.asarray(golden[path]))


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_lm2_to_hf_to_lm2_is_exact_with_memory(tmp_path, scan_layers):
  cfg, variables = load_hf_llama(TIED, scan_layers=scan_layers, **MEMORY)
  variables["params"]["memory_init"] = variables["params"]["memory_init"] + 1.0  # not the init
  written = save_hf_llama(cfg, variables, tmp_path)
  assert MEMORY_FILE in written
  assert not any("memory" in name for name in _hf_tensors(tmp_path))
  cfg2, variables2 = load_hf_llama(tmp_path)
  assert cfg2 == cfg
  _assert_params_equal(variables2, variables)
  # The other layout restores the same values, and the backbone alone is still the golden Llama.
  cfg3, variables3 = load_hf_llama(tmp_path, scan_layers=not scan_layers)
  assert cfg3.scan_layers != cfg.scan_layers
  np.testing.assert_array_equal(np.asarray(_flat(variables3)[("memory_init",)]),
                                np.asarray(_flat(variables)[("memory_init",)]))
  cfg4, backbone = load_hf_llama(tmp_path, use_memory=False)
  golden = np.load(TIED / "logits.npy")
  assert np.abs(_logits(cfg4, backbone, np.load(TIED / "input_ids.npy")) - golden).max() <= 1e-4


def test_load_onto_a_mesh_keeps_the_requested_shardings():
  cfg, _ = load_hf_llama(UNTIED, scan_layers=True, **SEG)
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  specs = nn.get_partition_spec(
      jax.eval_shape(LM2(cfg).init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32)))
  shardings = logical_shardings(specs, mesh)
  cfg, variables = load_hf_llama(UNTIED, shardings=shardings, scan_layers=True, **SEG)
  wanted = _flat(shardings)
  for path, array in _flat(variables).items():
    assert array.sharding.is_equivalent_to(wanted[path], array.ndim), path
  up = _flat(variables)[("blocks", "mlp", "up_proj", "kernel")]       # [L, D, F] over fsdp x tensor
  assert up.sharding.shard_shape(up.shape) == (2, 32, 64)
  error = np.abs(_logits(cfg, variables, np.load(UNTIED / "input_ids.npy"))
                 - np.load(UNTIED / "logits.npy")).max()
  assert error <= 1e-4


def test_cli_import_export_round_trip(tmp_path, capsys):
  hf_dir = tmp_path / "hf"
  shutil.copytree(TIED, hf_dir)
  (hf_dir / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
  ckpt, out = tmp_path / "ckpt", tmp_path / "out"
  assert cli_main(["import", "--hf", str(hf_dir), "--out", str(ckpt), "segment_length=16",
                   "scan_layers=true"]) == 0
  assert (ckpt / "model.yaml").is_file() and (ckpt / "tokenizer.json").is_file()
  cfg, restored = restore_checkpoint(ckpt)
  assert cfg.scan_layers and cfg.segment_length == 16 and not cfg.use_memory
  _, direct = load_hf_llama(hf_dir, scan_layers=True, **SEG)
  _assert_params_equal(restored, direct)
  assert cli_main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
  assert (out / "tokenizer.json").read_text() == (hf_dir / "tokenizer.json").read_text()
  original, exported = _hf_tensors(TIED), _hf_tensors(out)
  assert sorted(original) == sorted(exported)
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  capsys.readouterr()
  assert cli_main(["import", "--hf", str(hf_dir), "--out", str(ckpt)]) == 2
  assert "already exists" in capsys.readouterr().err


def _trainer_run(run_dir, cfg, params, tokenizer_json):
  """A train.py run directory (config.yaml + checkpoints/3/{state,config}) holding `params`."""
  tx = optimizer_lib.make_optimizer(TrainConfig())
  state = state_lib.TrainState(step=jnp.asarray(3, jnp.int32), params=params,
                               opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
  run = {"name": run_dir.name, "model": cfg.to_dict(),
         "data": {"tokenizer": "hf", "tokenizer_path": str(tokenizer_json)}}
  run_dir.mkdir(parents=True)
  (run_dir / "config.yaml").write_text(json.dumps(run))  # JSON is YAML
  checkpointer = train_checkpoint.Checkpointer(run_dir / "checkpoints",
                                               CheckpointConfig(async_save=False))
  checkpointer.save(3, state, config=run)
  checkpointer.close()


@pytest.mark.parametrize("which", ["run", "checkpoints", "step"])
def test_cli_export_from_a_trainer_checkpoint(tmp_path, which):
  """`export --checkpoint` also takes a train.py run, its checkpoints/ or a step directory."""
  cfg, variables = load_hf_llama(LLAMA3, scan_layers=True, use_memory=True, memory_layers=1,
                                 num_slots=8, memory_init="learned", **SEG)
  tokenizer = tmp_path / "my_tokenizer.json"
  tokenizer.write_text('{"model": {"type": "BPE"}}')
  run_dir = tmp_path / "runs" / "warm"
  _trainer_run(run_dir, cfg, variables["params"], tokenizer)
  path = {"run": run_dir, "checkpoints": run_dir / "checkpoints",
          "step": run_dir / "checkpoints" / "3"}[which]
  out = tmp_path / "out"
  assert cli_main(["export", "--checkpoint", str(path), "--out", str(out)]) == 0
  assert (out / "tokenizer.json").read_text() == tokenizer.read_text()
  assert (out / MEMORY_FILE).is_file()
  original, exported = _hf_tensors(LLAMA3), _hf_tensors(out)
  assert sorted(original) == sorted(exported)
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  cfg2, variables2 = load_hf_llama(out)
  assert cfg2 == cfg
  _assert_params_equal(variables2, variables)


def test_cli_export_of_a_directory_without_a_checkpoint(tmp_path, capsys):
  assert cli_main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
  assert re.search("no <step>/state.*convert import", capsys.readouterr().err)


def test_write_safetensors_shards_and_reads_back(tmp_path):
  arrays = {f"t{i}": np.arange(i * 10, dtype=np.float32).reshape(i, 10) for i in range(1, 6)}
  written = write_safetensors(iter(arrays.items()), tmp_path, max_shard_bytes=120)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert written[-1] == "model.safetensors.index.json"
  assert len(set(index["weight_map"].values())) == len(written) - 1 > 1
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in arrays.values())
  back = _hf_tensors(tmp_path)
  assert sorted(back) == sorted(arrays)
  for name, array in arrays.items():
    np.testing.assert_array_equal(back[name], array)
  with pytest.raises(ValueError, match="given twice"):
    write_safetensors([("a", np.zeros(2)), ("a", np.zeros(2))], tmp_path / "dup")


# Bad input: each error names the file, key or tensor at fault.


def _copy(tmp_path, src=TIED):
  dst = tmp_path / src.name
  shutil.copytree(src, dst)
  return dst


def _edit_config(hf_dir, **changes):
  config = json.loads((hf_dir / "config.json").read_text())
  config.update(changes)
  (hf_dir / "config.json").write_text(json.dumps(config))


def _rewrite_weights(hf_dir, edit):
  path = hf_dir / "model.safetensors"
  tensors = safetensors.numpy.load_file(str(path))
  edit(tensors)
  safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_config_json(tmp_path):
  hf_dir = _copy(tmp_path)
  (hf_dir / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_hf_llama(hf_dir, **SEG)
  with pytest.raises(FileNotFoundError, match="not found"):
    load_hf_llama(tmp_path / "nowhere", **SEG)


def test_non_llama_architecture(tmp_path):
  hf_dir = _copy(tmp_path)
  _edit_config(hf_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
  with pytest.raises(ValueError, match="not a Llama model.*GPT2LMHeadModel"):
    load_hf_llama(hf_dir, **SEG)


def test_unsupported_or_inconsistent_rope_is_refused(tmp_path):
  hf_dir = _copy(tmp_path)
  _edit_config(hf_dir, rope_scaling={"rope_type": "yarn", "factor": 4.0})
  with pytest.raises(ValueError, match="rope_scaling has rope_type 'yarn'"):
    load_hf_llama(hf_dir, **SEG)
  _edit_config(hf_dir, rope_scaling=None,
               rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
  with pytest.raises(ValueError, match="rope_parameters has rope_type 'linear'"):
    load_hf_llama(hf_dir, **SEG)
  _edit_config(hf_dir, rope_parameters=None, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                           "high_freq_factor": 4.0})
  with pytest.raises(ValueError, match="rope_scaling with rope_type 'llama3' lacks 'low_freq_factor'"):
    load_hf_llama(hf_dir, **SEG)
  llama3 = _copy(tmp_path, LLAMA3)
  config = json.loads((llama3 / "config.json").read_text())
  stale = {**config["rope_parameters"], "factor": 4.0}
  _edit_config(llama3, rope_scaling=stale)
  with pytest.raises(ValueError, match="rope_scaling .* and rope_parameters .* describe different"):
    load_hf_llama(llama3, **SEG)


def test_override_contradicting_the_weights(tmp_path):
  with pytest.raises(ValueError, match="override d_model=32 contradicts"):
    load_hf_llama(TIED, d_model=32, **SEG)
  with pytest.raises(ValueError, match="segment_lenght"):
    load_hf_llama(TIED, segment_lenght=16)


def test_missing_tensor(tmp_path):
  hf_dir = _copy(tmp_path)
  _rewrite_weights(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing tensor\(s\) \['model.layers.1.mlp.up_proj.weight'"):
    load_hf_llama(hf_dir, **SEG)


def test_extra_tensor(tmp_path):
  hf_dir = _copy(tmp_path)
  _rewrite_weights(hf_dir, lambda t: t.update({"model.layers.2.mlp.up_proj.weight":
                                               t["model.layers.1.mlp.up_proj.weight"]}))
  with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['model.layers.2.mlp.up_proj"):
    load_hf_llama(hf_dir, **SEG)


def test_shape_mismatch(tmp_path):
  hf_dir = _copy(tmp_path)
  _rewrite_weights(hf_dir, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight":
                                               np.zeros((64, 64), np.float32)}))
  with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape "
                                       r"\[64, 64\], the config implies \[32, 64\]"):
    load_hf_llama(hf_dir, **SEG)


def test_missing_shard_and_bad_memory_file(tmp_path):
  hf_dir = _copy(tmp_path, UNTIED)
  (hf_dir / "model-00002-of-00003.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors, which is missing"):
    load_hf_llama(hf_dir, **SEG)
  tied = _copy(tmp_path)
  safetensors.numpy.save_file({"block_0/memory/query/kernel": np.zeros((64, 1, 64), np.float32)},
                              str(tied / MEMORY_FILE), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=f"{MEMORY_FILE}: missing tensor"):
    load_hf_llama(tied, **MEMORY)
