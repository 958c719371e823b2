"""An exported policy's tokenizer loads in transformers 4.57 (the version LLaDA's public code and the AGRPO
release run) as in the installed 5.x. The 4.57 side is read from a fixture (the class names 4.57 knows);
tests/fixtures/transformers457/check_export.py loads exports in a real 4.57 interpreter."""
import json
from pathlib import Path

import pytest

from common.tokenizers import CharTokenizer, HFTokenizer

FIXTURES = Path(__file__).parent / "fixtures"
KNOWN_457 = set(json.loads((FIXTURES / "transformers457" / "tokenizer_classes.json").read_text())["tokenizer_classes"])
TEXT = "<|im_start|>ab 12<|im_end|><eot><mask>"


@pytest.mark.parametrize("kind", ["char", "sdar"])
def test_an_exported_tokenizer_names_what_transformers_4_57_loads_and_loads_the_same_here(tmp_path, kind):
    from transformers import AutoTokenizer

    if kind == "char":
        tok = CharTokenizer()
        hf = tok.to_hf()
    else:
        tok = HFTokenizer(FIXTURES / "tokenizers" / "sdar", mask_id=1)
        hf = tok.tok
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] in KNOWN_457, config["tokenizer_class"]
    # 4.57 reads extra_special_tokens as a dict of named tokens: a list (what 5.x writes) fails to load there.
    assert isinstance(config.get("extra_special_tokens", {}), dict)
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again(TEXT, add_special_tokens=False)["input_ids"] == hf(TEXT, add_special_tokens=False)["input_ids"]
    assert set(again.all_special_tokens) == set(hf.all_special_tokens)
