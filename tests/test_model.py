import json

import pytest
import torch
from safetensors.torch import save_file

from common.model import CheckpointError, build_model, load_pretrained, preset_config, save_pretrained
from common.tokenizers import CharTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return build_model(preset_config("tiny"), seed=0).eval()


def test_llada_8b_preset_has_the_reference_parameter_count():
    model = build_model(preset_config("llada-8b"), device="meta")
    assert sum(p.numel() for p in model.parameters()) == 8_015_581_184
    keys = set(model.state_dict())
    assert "model.transformer.wte.weight" in keys and "model.transformer.ff_out.weight" in keys
    assert "model.transformer.blocks.31.up_proj.weight" in keys and "model.transformer.ln_f.weight" in keys


def test_weight_tying_drops_the_output_projection():
    model = build_model(preset_config("tiny", weight_tying=True), seed=0)
    assert "model.transformer.ff_out.weight" not in model.state_dict()
    ids = torch.randint(0, 101, (1, 7))
    assert model(ids).logits.shape == (1, 7, 101)


@pytest.mark.parametrize("shard", [False, True])
def test_save_load_round_trip_gives_identical_logits(tiny, tmp_path, shard):
    save_pretrained(tiny, tmp_path, max_shard_size=200_000 if shard else "4GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    loaded = load_pretrained(tmp_path)
    ids = torch.randint(0, 101, (2, 19))
    assert torch.equal(loaded(ids).logits, tiny(ids).logits)


def test_attention_is_bidirectional(tiny):
    ids = torch.randint(5, 101, (1, 16))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1 - 5) % 96 + 5
    with torch.no_grad():
        a, b = tiny(ids).logits, tiny(changed).logits
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4


def test_padded_and_unpadded_batches_agree_on_real_positions(tiny):
    short, long = torch.randint(5, 101, (1, 6)), torch.randint(5, 101, (1, 11))
    batch = torch.zeros(2, 11, dtype=torch.long)
    batch[0, :6], batch[1] = short[0], long[0]
    mask = torch.zeros(2, 11, dtype=torch.long)
    mask[0, :6], mask[1] = 1, 1
    with torch.no_grad():
        padded = tiny(batch, attention_mask=mask).logits
        alone = tiny(short).logits
    torch.testing.assert_close(padded[0, :6], alone[0], rtol=1e-5, atol=1e-5)
    # Left padding agrees too once positions count real tokens only.
    left = torch.zeros(1, 11, dtype=torch.long)
    left[0, 5:] = short[0]
    lmask = (left != 0).long()
    lmask[0, 5:] = 1
    pos = (lmask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        lpad = tiny(left, attention_mask=lmask, position_ids=pos).logits
    torch.testing.assert_close(lpad[0, 5:], alone[0], rtol=1e-5, atol=1e-5)


def test_bf16_and_activation_checkpointing_paths_run(tiny):
    model = build_model(preset_config("tiny"), seed=0)
    model.set_activation_checkpointing(True)
    ids = torch.randint(0, 101, (2, 9))
    model(ids).logits.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    reference = build_model(preset_config("tiny"), seed=0)
    reference(ids).logits.sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    half = build_model(preset_config("tiny"), dtype="bfloat16", seed=0)
    assert half(ids).logits.dtype == torch.bfloat16


def test_bad_checkpoints_name_file_and_key(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_pretrained(tmp_path)
    save_pretrained(tiny, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not supported; supported: 'llada'"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    state = dict(tiny.state_dict())
    del state["model.transformer.blocks.2.q_proj.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'model.transformer.blocks.2.q_proj.weight' missing"):
        load_pretrained(tmp_path)
    state["model.transformer.blocks.2.q_proj.weight"] = torch.zeros(3, 3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks.2.q_proj.weight' has shape \(3, 3\)"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(tiny.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickled weights are not loaded"):
        load_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable"):
        load_pretrained(tmp_path)


def test_char_tokenizer_round_trip(tmp_path):
    tok = CharTokenizer()
    text = "3+5*(2-1)=8\n<answer>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 101 and tok.mask_id == 3 and tok.eos_id == 2
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size


def test_char_tokenizer_export_loads_with_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = CharTokenizer()
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    text = "Use 3, 5 and 7 to make 8?\n<answer>(7-5)*3+2</answer> naïve\ttab"  # é/ï and \t map to '?'
    ids = tok.encode(text)
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    assert hf.decode(ids) == tok.decode(ids)
    specials = [tok.bos_id, *ids[:4], tok.eot_id, tok.eos_id, tok.pad_id, tok.mask_id]
    assert hf.decode(specials, skip_special_tokens=True) == tok.decode(specials) == "Use "
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.mask_token_id) == (0, 1, 2, 3)
    assert len(hf) == tok.vocab_size
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert hf.apply_chat_template(messages, tokenize=False) == tok.format_prompt("2+2?", system="Be brief.")


def test_hf_tokenizer_loads_from_local_files_with_chat_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|startoftext|>": 1, "<|mdm_mask|>": 2, "<|eot_id|>": 3, "hi": 4, "there": 5, "[UNK]": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|startoftext|>",
                                   unk_token="[UNK]")
    fast.chat_template = "{% for m in messages %}<|startoftext|>{{ m['content'] }}<|eot_id|>{% endfor %}"
    fast.save_pretrained(tmp_path)
    # a checkpoint folder: the mask id comes from config.json, the end-of-turn token from the family
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llada", "mask_token_id": 2}))
    tok = load_tokenizer(tmp_path)
    assert tok.mask_id == 2 and tok.eos_id == 0 and tok.eot_id == 3
    assert tok.encode("hi there") == [4, 5]
    assert tok.format_prompt("hi").startswith("<|startoftext|>hi<|eot_id|>")


def test_the_public_llada_default_bias_for_layer_norm_null_loads(tmp_path):
    """The public LLaDA configuration's default bias_for_layer_norm is None ("same as include_bias")."""
    from common.model import read_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llada", "bias_for_layer_norm": None,
                                                      "include_bias": False}))
    assert read_config(tmp_path).bias_for_layer_norm is False
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llada", "bias_for_layer_norm": None,
                                                      "include_bias": True}))
    with pytest.raises(CheckpointError, match="include_bias=True is not supported"):
        read_config(tmp_path)
