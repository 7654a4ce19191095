"""Tokenisation with the ``tokenizers`` package, Qwen special tokens, and small vocabularies for tiny models.

:class:`Tokenizer` wraps a ``tokenizer.json`` (a real Qwen2.5-VL one, or one built here) and resolves the special
tokens the model and the chat template need. :func:`build_byte_tokenizer` is the 256-byte vocabulary (unit tests
script byte by byte); :func:`build_bpe_tokenizer` trains a byte-level BPE with Qwen2's pre-tokenisation (words
with their leading space or punctuation, digits one by one, punctuation runs) on a corpus, as the embedded model's
vocabulary is made.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"

# Qwen2.5's added tokens in id order (151643 ... 151664 in the real vocabulary); (text, special).
QWEN_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True),
    (IM_START, True),
    (IM_END, True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    (VISION_START, True),
    (VISION_END, True),
    ("<|vision_pad|>", True),
    (IMAGE_PAD, True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character table (what ByteLevel pre-tokenisation emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_byte_tokenizer() -> HFTokenizer:
    """The tiny vocabulary: ids 0–255 are the 256 bytes, 256+ the Qwen special tokens (278 ids in all)."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(text, special=special, normalized=False) for text, special in QWEN_SPECIAL_TOKENS])
    return tok


QWEN2_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""The split Qwen2/2.5's tokenizer.json applies before byte-level BPE."""


def build_bpe_tokenizer(corpus: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Byte-level BPE trained on ``corpus`` (all 256 bytes always in the vocabulary, so any text encodes), Qwen2
    pre-tokenisation, then the Qwen special tokens. Deterministic for a given corpus and size."""
    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(text, special=special, normalized=False) for text, special in QWEN_SPECIAL_TOKENS])
    return tok


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the Qwen special-token ids."""

    def __init__(self, tok: HFTokenizer, source: str = "tokenizer") -> None:
        self.tok = tok
        ids = {}
        for name in (IM_START, IM_END, ENDOFTEXT, VISION_START, VISION_END, IMAGE_PAD):
            i = tok.token_to_id(name)
            if i is None:
                raise ValueError(f"{source}: special token {name} is not in the vocabulary")
            ids[name] = i
        self.im_start_id, self.im_end_id, self.endoftext_id = ids[IM_START], ids[IM_END], ids[ENDOFTEXT]
        self.vision_start_id, self.vision_end_id, self.image_pad_id = ids[VISION_START], ids[VISION_END], ids[IMAGE_PAD]

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (a folder holding it, or the file)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json")
        return cls(HFTokenizer.from_file(str(file)), str(file))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Tokens that end an assistant turn: <|im_end|> and <|endoftext|>."""
        return (self.im_end_id, self.endoftext_id)

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text → ids; special-token strings in the text become their ids."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Text → (ids, character span of each id)."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))
