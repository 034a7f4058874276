"""ModelConfig: YAML loading, overrides, and validation errors that name the bad key."""

import glob

import pytest

from lm2_jax.model import ModelConfig


def test_yaml_and_overrides():
  cfg = ModelConfig.from_yaml("configs/model/tiny.yaml", num_slots=16, memory_flow="per_block")
  assert cfg.num_slots == 16 and cfg.memory_flow == "per_block"
  assert cfg.d_model == 32  # from the file
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
  assert cfg.replace(num_layers=3).num_layers == 3


@pytest.mark.parametrize("path", sorted(glob.glob("configs/model/*.yaml")))
def test_shipped_configs_load(path):
  cfg = ModelConfig.from_yaml(path)
  assert cfg.d_model % cfg.num_heads == 0


@pytest.mark.parametrize("overrides, key", [
    (dict(memory_init="identity", num_slots=64), "num_slots"),
    (dict(num_heads=3), "num_heads"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(memory_heads=3), "memory_heads"),
    (dict(memory_flow="sideways"), "memory_flow"),
    (dict(attention="full"), "attention"),
    (dict(read_topk=99), "read_topk"),
    (dict(memory_layers=7), "memory_layers"),
    (dict(bptt_segments=-1), "bptt_segments"),
    (dict(d_model="wide"), "d_model"),
    (dict(use_memory="yes"), "use_memory"),
])
def test_invalid_values_name_the_key(overrides, key):
  with pytest.raises((ValueError, TypeError), match=key):
    ModelConfig.from_yaml("configs/model/tiny.yaml", **overrides)


def test_unknown_key_and_missing_file(tmp_path):
  with pytest.raises(ValueError, match="num_slotz"):
    ModelConfig.from_yaml("configs/model/tiny.yaml", num_slotz=3)
  bad = tmp_path / "bad.yaml"
  bad.write_text("d_model: 32\nwidth: 7\n")
  with pytest.raises(ValueError, match=r"bad\.yaml.*width"):
    ModelConfig.from_yaml(bad)
  with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
    ModelConfig.from_yaml(tmp_path / "nowhere.yaml")


def test_memoryless_full_attention_is_valid():
  cfg = ModelConfig.from_yaml("configs/model/tiny.yaml", use_memory=False, attention="full")
  assert cfg.num_memory_layers == 0
