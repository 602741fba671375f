"""PaliGemma prompt tokenization exactly as openpi builds pi05 prompts.

openpi ``src/openpi/models/tokenizer.py`` L22-48 (``PaligemmaTokenizer.tokenize``), called from
``transforms.TokenizePrompt`` (spec section 5.2):

1. clean the task text: ``strip()``, then ``_`` -> space, then ``\\n`` -> space;
2. with the state in the prompt (``discrete_state_input``): discretize the *normalized* state into
   256 bins, ``np.digitize(x, linspace(-1, 1, 257)[:-1]) - 1`` (so x < -1 -> -1, x >= 0.9921875
   -> 255), and encode ``"Task: {text}, State: {b1 b2 ...};\\nAction: "`` in one call with BOS;
3. without it (``pi05_libero``): ``[BOS] + encode(text) + encode("\\n")``;
4. right-pad with id 0 to ``max_token_len`` (mask False on padding), or cut to ``max_token_len``
   with a warning.

The tokenizer is PaliGemma's SentencePiece model (``paligemma_tokenizer.model``, 257,152 pieces), or
a Hugging Face ``tokenizer.json`` of the same vocabulary (lerobot users have that); the libraries
``sentencepiece`` and ``tokenizers`` do the encoding.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from pi05_export.errors import ConfigError, InputError, first_line

log = logging.getLogger(__name__)

STATE_BINS = 256
# openpi tokenizer.py: np.linspace(-1, 1, 256 + 1)[:-1]; -1 + k/128 is exact in float64.
STATE_BIN_EDGES = -1.0 + np.arange(STATE_BINS, dtype=np.float64) * (2.0 / STATE_BINS)
TOKENIZER_NAMES = ("paligemma_tokenizer.model", "tokenizer.model", "tokenizer.json")
OPENPI_CACHE_TOKENIZER = Path("big_vision") / "paligemma_tokenizer.model"


def openpi_cache_dir() -> Path:
    """openpi's download cache: ``$OPENPI_DATA_HOME`` or ``~/.cache/openpi`` (shared/download.py)."""
    return Path(os.environ.get("OPENPI_DATA_HOME", Path.home() / ".cache" / "openpi")).expanduser()


def clean_prompt(text: str) -> str:
    """openpi's cleaning: strip, ``_`` -> space, newline -> space (tokenizer.py L30)."""
    return text.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state_norm: np.ndarray) -> np.ndarray:
    """Normalized state float64 [d] -> int64 bins in [-1, 255] (openpi tokenizer.py L33)."""
    return np.digitize(np.asarray(state_norm, dtype=np.float64), STATE_BIN_EDGES) - 1


def state_prompt(text: str, state_norm: np.ndarray) -> str:
    """The exact pi05 state-in-prompt string: ``Task: {clean}, State: {bins};\\nAction: ``."""
    bins = " ".join(str(int(b)) for b in discretize_state(state_norm))
    return f"Task: {clean_prompt(text)}, State: {bins};\nAction: "


class PromptTokenizer:
    """PaliGemma tokenizer from a SentencePiece ``.model`` or a Hugging Face ``tokenizer.json``.

    Raises :class:`ConfigError` when the file cannot be loaded or has no BOS token.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            if self.path.suffix == ".json":
                from tokenizers import Tokenizer

                self._hf = Tokenizer.from_file(str(self.path))
                self._sp = None
                bos = self._hf.token_to_id("<bos>")
                # Added tokens (PaliGemma's tokenizer.json adds <image> at 257152) are never produced by
                # prompts; ids are still range-checked against the model per prompt.
                self.vocab_size = int(self._hf.get_vocab_size(with_added_tokens=False))
            else:
                import sentencepiece as spm

                self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
                self._hf = None
                bos = self._sp.bos_id()
                self.vocab_size = int(self._sp.get_piece_size())
        except Exception as e:  # noqa: BLE001  (sentencepiece and tokenizers raise plain Exception / RuntimeError)
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"cannot load tokenizer {self.path}: {first_line(e)}",
                              hint="pass PaliGemma's paligemma_tokenizer.model or a tokenizer.json") from None
        if bos is None or bos < 0:
            raise ConfigError(f"tokenizer {self.path} has no BOS token", hint="use PaliGemma's tokenizer (BOS id 2)")
        self.bos_id = int(bos)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens."""
        if self._sp is not None:
            return list(self._sp.encode(text))
        assert self._hf is not None
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def prompt_ids(self, text: str, state_norm: np.ndarray | None) -> list[int]:
        """Unpadded ids for a prompt: the state form when ``state_norm`` is given, else openpi's no-state form."""
        if state_norm is not None:
            return [self.bos_id, *self.encode(state_prompt(text, state_norm))]
        return [self.bos_id, *self.encode(clean_prompt(text)), *self.encode("\n")]

    def tokenize(self, text: str, state_norm: np.ndarray | None, max_len: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(tokens int64 [max_len], mask bool [max_len], number of tokens cut). Pads with id 0."""
        ids = self.prompt_ids(text, state_norm)
        cut = max(0, len(ids) - max_len)
        if cut:
            log.warning("prompt is %d tokens, longer than max_token_len %d: cut %d token(s) from the end (%r)",
                        len(ids), max_len, cut, text[:60])
            ids = ids[:max_len]
        tokens = np.zeros(max_len, dtype=np.int64)
        tokens[: len(ids)] = ids
        mask = np.zeros(max_len, dtype=bool)
        mask[: len(ids)] = True
        return tokens, mask, cut


def find_tokenizer(explicit: str | Path | None, roots: list[Path]) -> Path:
    """The tokenizer file: ``explicit``, else the first of :data:`TOKENIZER_NAMES` found in a root or
    its ``assets/``, else openpi's cache ``~/.cache/openpi/big_vision/paligemma_tokenizer.model``.

    Raises :class:`InputError` naming every place looked.
    """
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise InputError(f"tokenizer {p} does not exist", hint="pass --tokenizer paligemma_tokenizer.model (or tokenizer.json)")
        return p
    candidates = [d / name for root in roots for d in (root, root / "assets") for name in TOKENIZER_NAMES]
    candidates.append(openpi_cache_dir() / OPENPI_CACHE_TOKENIZER)
    for c in candidates:
        if c.is_file():
            return c
    places = [str(r / "assets") for r in roots] + [str(openpi_cache_dir() / OPENPI_CACHE_TOKENIZER)]
    raise InputError(f"no PaliGemma tokenizer found (looked in {', '.join(places)})",
                     hint="pass --tokenizer PATH (openpi downloads it from gs://big_vision/paligemma_tokenizer.model)")


def check_vocab(tokenizer: PromptTokenizer, model_vocab: int) -> None:
    if tokenizer.vocab_size > model_vocab:
        raise ConfigError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model embeds only {model_vocab}",
                          hint="use the tokenizer the checkpoint was trained with (PaliGemma: 257152)")
