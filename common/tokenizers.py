"""Tokenizers behind one small interface: a checkpoint's own HF tokenizer, or a built-in character one.

The character tokenizer is saved into the checkpoint directory (``unmask_tokenizer.json``), so a
save/load round-trip restores exactly the same ids. It also writes the same vocabulary as a HF
``tokenizer.json`` (a merge-free BPE over the characters, built with the ``tokenizers`` library), so
``AutoTokenizer.from_pretrained(export)`` encodes and decodes exactly as it does.
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Protocol, Sequence

CHAR_TOKENIZER_FILE = "unmask_tokenizer.json"


class Tokenizer(Protocol):
    """What the sampler, tasks and learner need from a tokenizer."""

    mask_id: int
    eos_id: int
    pad_id: int
    bos_id: int | None
    eot_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...
    def format_prompt(self, user: str, system: str | None = None) -> str: ...
    def save(self, directory: str | Path) -> None: ...


class CharTokenizer:
    """One id per character; ids 0..4 are PAD, BOS, EOS, MASK, EOT. Unknown characters map to '?'."""

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<mask>", "<eot>")

    def __init__(self, alphabet: str | None = None):
        self.alphabet = alphabet if alphabet is not None else string.printable[:95] + "\n"
        if len(set(self.alphabet)) != len(self.alphabet):
            raise ValueError("character tokenizer alphabet has duplicate characters")
        self.pad_id, self.bos_id, self.eos_id, self.mask_id, self.eot_id = range(len(self.SPECIALS))
        offset = len(self.SPECIALS)
        self._id = {c: i + offset for i, c in enumerate(self.alphabet)}
        self._char = {i: c for c, i in self._id.items()}
        self._unknown = self._id.get("?", offset)
        self.vocab_size = offset + len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        return [self._id.get(c, self._unknown) for c in text]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i in self._char:
                out.append(self._char[i])
            elif not skip_special and 0 <= i < len(self.SPECIALS):
                out.append(self.SPECIALS[i])
        return "".join(out)

    def format_prompt(self, user: str, system: str | None = None) -> str:
        return user if system is None else f"{system}\n{user}"

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CHAR_TOKENIZER_FILE
        path.write_text(json.dumps({"type": "char", "specials": list(self.SPECIALS), "alphabet": self.alphabet}))
        self.to_hf().save_pretrained(str(directory))
        portable_tokenizer_config(directory)

    def to_hf(self):
        """The same ids as a transformers fast tokenizer (what ``AutoTokenizer`` loads from an export)."""
        from tokenizers import Tokenizer, decoders, models
        from transformers import PreTrainedTokenizerFast

        vocab = {token: i for i, token in enumerate(self.SPECIALS)}
        vocab.update(self._id)
        # No merges: every character is its own token; unknown characters become '?', as in ``encode``.
        # '?' is the model's unk only, not a special token, so skip_special_tokens keeps it.
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=self.alphabet[self._unknown - len(self.SPECIALS)]))
        backend.decoder = decoders.Fuse()  # join characters without spaces
        pad, bos, eos, mask, eot = self.SPECIALS
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, pad_token=pad, bos_token=bos, eos_token=eos, mask_token=mask,
            additional_special_tokens=[eot],
            chat_template="{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}{{ m['content'] }}{% endfor %}",
        )

    @classmethod
    def load(cls, directory: str | Path) -> "CharTokenizer":
        file = Path(directory) / CHAR_TOKENIZER_FILE
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e.msg})") from None
        if data.get("type") != "char" or data.get("specials") != list(cls.SPECIALS):
            raise ValueError(f"{file}: not an Unmask character tokenizer")
        return cls(data["alphabet"])


class HFTokenizer:
    """A checkpoint's own tokenizer (any family's), loaded from local files only, chat template applied.

    The mask and end-of-turn ids come from the model family (``mask_id`` from config.json's
    ``mask_token_id``, ``eot_token`` the family's end-of-turn text), not from guesses over the vocabulary.
    """

    def __init__(self, directory: str | Path, mask_id: int | None = None, eot_token: str | None = None,
                 tokenizer_class: str | None = None):
        import transformers

        loader = getattr(transformers, tokenizer_class) if tokenizer_class else transformers.AutoTokenizer
        self.tok = loader.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        vocab = self.tok.get_vocab()
        if mask_id is None:
            mask_id = self.tok.mask_token_id
        if mask_id is None:
            raise ValueError(f"{directory}: no mask token id (config.json mask_token_id or the tokenizer's mask_token)")
        self.mask_id = int(mask_id)
        if self.tok.eos_token_id is None:
            raise ValueError(f"{directory}: the tokenizer has no eos_token")
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.bos_id = self.tok.bos_token_id
        self.eot_id = vocab.get(eot_token) if eot_token else None
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def format_prompt(self, user: str, system: str | None = None) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        if self.tok.chat_template:
            return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tok.bos_token + user if self.tok.bos_token else user

    def save(self, directory: str | Path) -> None:
        self.tok.save_pretrained(str(directory))
        portable_tokenizer_config(directory)


def portable_tokenizer_config(directory: str | Path) -> None:
    """Rewrite the two fields transformers 5 saves that 4.57 (what LLaDA's public code and the AGRPO release run)
    cannot load, in names both read: class ``TokenizersBackend`` is ``PreTrainedTokenizerFast`` there, and a list
    of ``extra_special_tokens`` is ``additional_special_tokens`` (4.x reads ``extra_special_tokens`` as a dict)."""
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        del config["extra_special_tokens"]
        known = config.get("additional_special_tokens") or []
        config["additional_special_tokens"] = known + [t for t in extra if t not in known]
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in a checkpoint directory: ours if present, else the HF files there (special ids
    from the checkpoint's family)."""
    directory = Path(directory)
    if (directory / CHAR_TOKENIZER_FILE).is_file():
        return CharTokenizer.load(directory)
    if any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        config_file = directory / "config.json"
        if not config_file.is_file():
            return HFTokenizer(directory)
        from common.model.family import family_for_type
        import common.model  # noqa: F401  (registers the families)

        config = json.loads(config_file.read_text())
        family = family_for_type(config.get("model_type"), where=str(config_file))
        return HFTokenizer(directory, mask_id=config.get("mask_token_id"), eot_token=family.eot_token,
                           tokenizer_class=family.tokenizer_class)
    raise ValueError(f"{directory}: no tokenizer files (tokenizer.json or {CHAR_TOKENIZER_FILE})")
