"""transformers' Auto classes load our exports and LLaDA's public checkpoint layout through one path."""
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from common.model import CheckpointError, LLaDAModelLM, build_model, load_pretrained, preset_config, save_pretrained
from common.tokenizers import CharTokenizer

# LLaDA-8B-Instruct's config.json, shrunk to a tiny shape (every other field as published).
PUBLIC_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                 "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 64, "embedding_dropout": 0.0,
    "embedding_size": 101, "eos_token_id": 2, "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
    "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
    "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": 3, "max_sequence_length": 512,
    "mlp_hidden_size": 96, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 4,
    "n_kv_heads": 4, "n_layers": 2, "pad_token_id": 0, "precision": "amp_bf16", "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.46.3", "use_cache": False, "vocab_size": 101,
    "weight_tying": False,
}


@pytest.fixture(scope="module")
def tiny():
    return build_model(preset_config("tiny"), seed=0).eval()


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_method_and_free_save_write_the_same_sharded_layout(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "method", max_shard_size="300KB")
    save_pretrained(tiny, tmp_path / "free", max_shard_size=300_000)
    method, free = _files(tmp_path / "method"), _files(tmp_path / "free")
    assert method == free
    shards = sorted(n for n in method if n.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads(method["model.safetensors.index.json"])
    assert set(index["weight_map"]) == set(tiny.state_dict()) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tiny.state_dict().values())
    config = json.loads(method["config.json"])
    assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAModelLM"]
    # our registration loads it without remote code; trust_remote_code=True anywhere else loads the public code
    assert config["auto_map"]["AutoModel"] == "GSAI-ML/LLaDA-8B-Instruct--modeling_llada.LLaDAModelLM"
    generation = json.loads(method["generation_config.json"])
    assert (generation["eos_token_id"], generation["pad_token_id"], generation["mask_token_id"]) == (2, 0, 3)


@pytest.mark.parametrize("auto", [AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM])
def test_auto_classes_load_an_export_without_remote_code(tiny, tmp_path, auto):
    tiny.save_pretrained(tmp_path, max_shard_size="300KB")
    CharTokenizer().save(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), type(tiny.config))
    model = auto.from_pretrained(tmp_path)
    assert type(model) is LLaDAModelLM and not model.training
    ids = torch.randint(0, 101, (2, 13))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny(ids).logits)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer("7*8=56", add_special_tokens=False)["input_ids"] == CharTokenizer().encode("7*8=56")
    half = auto.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def _public_checkpoint(directory, seed=1):
    """What LLaDA's own code leaves on disk: its config.json, bf16 shards grouped by layer type, an index."""
    directory.mkdir()
    config = preset_config("tiny", d_model=64, n_layers=2, mlp_hidden_size=96, rope_theta=500000.0)
    state = {k: v.to(torch.bfloat16) for k, v in build_model(config, seed=seed).state_dict().items()}
    groups = {"model-00001-of-00003.safetensors": ("attn_out", "ff_out", "wte"),
              "model-00002-of-00003.safetensors": ("q_proj", "k_proj", "v_proj", "norm", "ln_f"),
              "model-00003-of-00003.safetensors": ("ff_proj", "up_proj")}
    weight_map = {}
    for name, parts in groups.items():
        shard = {k: v for k, v in state.items() if k not in weight_map and any(p in k for p in parts)}
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    assert set(weight_map) == set(state)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(v.numel() * 2 for v in state.values())}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(PUBLIC_CONFIG))
    (directory / "generation_config.json").write_text(
        json.dumps({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    return state


def test_public_llada_layout_loads_through_the_same_path(tmp_path):
    state = _public_checkpoint(tmp_path / "public")
    # auto_map names remote code; the registered local classes win without trust_remote_code.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "public")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # dtype "auto": config's torch_dtype
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    same = load_pretrained(tmp_path / "public", dtype="bfloat16")
    ids = torch.randint(0, 101, (1, 11))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, same(ids).logits)
    # And our save of it is again the public layout, reloadable with identical weights.
    model.save_pretrained(tmp_path / "again", max_shard_size="40KB")
    again = AutoModel.from_pretrained(tmp_path / "again")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
    assert json.loads((tmp_path / "again" / "config.json").read_text())["init_fn"] == "mitchell"


def test_unsupported_public_variants_are_refused_in_one_line(tmp_path):
    _public_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**PUBLIC_CONFIG, "include_qkv_bias": True}))
    with pytest.raises(CheckpointError, match="include_qkv_bias=True is not supported"):
        load_pretrained(tmp_path / "ckpt")


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_checkpoints_fail_in_one_line_through_auto_model(tiny, tmp_path):
    tiny.save_pretrained(tmp_path, max_shard_size="300KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = tmp_path / sorted(set(index["weight_map"].values()))[1]
    moved = shard.rename(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError) as e:
        AutoModel.from_pretrained(tmp_path)
    assert f"{shard.name}: listed in model.safetensors.index.json but missing" in _one_line(e)
    moved.rename(shard)

    index["weight_map"]["model.transformer.blocks.9.q_proj.weight"] = shard.name
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "'model.transformer.blocks.9.q_proj.weight' is in model.safetensors.index.json but not in" in _one_line(e)

    for stale in tmp_path.glob("model*"):
        stale.unlink()
    torch.save(tiny.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        AutoModel.from_pretrained(tmp_path)
    assert "pytorch_model.bin: pickled weights are not loaded" in _one_line(e)


def test_wrong_keys_are_named_before_any_weight_is_read(tiny, tmp_path, monkeypatch):
    state = {k.replace("model.transformer.", "transformer."): v for k, v in tiny.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    tiny.config.to_json_file(tmp_path / "config.json")
    from safetensors import safe_open

    reads = []

    class Counting:
        def __init__(self, *args, **kwargs):
            self.f = safe_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_slice(self, key):
            return self.f.get_slice(key)

        def get_tensor(self, key):
            reads.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr("common.model.io.safe_open", Counting)
    with pytest.raises(CheckpointError) as e:
        AutoModel.from_pretrained(tmp_path)
    assert "tensor 'model.transformer.blocks.0.attn_norm.weight' missing" in _one_line(e)
    assert reads == []  # the headers alone told


def test_hub_ids_resolve_through_the_local_cache_offline(tiny, tmp_path):
    snapshot = tmp_path / "cache" / "models--someone--tiny-llada" / "snapshots" / ("0" * 40)
    tiny.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    hub = {"cache_dir": str(tmp_path / "cache"), "local_files_only": True}
    model = AutoModel.from_pretrained("someone/tiny-llada", **hub)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny.state_dict().items())
    with pytest.raises(CheckpointError) as e:
        LLaDAModelLM.from_pretrained("someone/absent", **hub)
    assert "someone/absent: not a local directory" in _one_line(e)


@pytest.mark.gpu
def test_weights_stream_onto_the_gpu(tiny, tmp_path):
    tiny.save_pretrained(tmp_path, max_shard_size="300KB")
    model = AutoModel.from_pretrained(tmp_path, device_map="cuda", dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    ids = torch.randint(0, 101, (1, 9))
    reference = build_model(preset_config("tiny"), dtype="bfloat16", seed=0).eval()
    torch.testing.assert_close(model(ids.cuda()).logits.float().cpu(), reference(ids).logits.float())
