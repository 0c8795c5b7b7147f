"""Build the SentencePiece tokenizer of the demo model ``exclip-scenes-siglip`` from the scenes' captions.

    python scripts/make_scenes_tokenizer.py attribution/tokenizers_data/exclip-scenes-siglip

A BPE SentencePiece model trained on captions of ``attribution/evaluation/scenes.py`` (every word of
their vocabulary becomes one piece) plus the lower-case alphabet and digits (so any other word still
tokenizes, letter by letter), wrapped by ``transformers.SiglipTokenizer`` as SigLIP's is and written
with ``save_pretrained``: open_clip's ``HFTokenizer`` loads the directory offline. SigLIP's ids: pad 0,
end-of-text 1, unknown 2, no start token.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm
from transformers import SiglipTokenizer

from attribution.evaluation.scenes import generate_scenes

VOCAB_SIZE = 128  # the scenes' ~30 words, their characters and the merges between
_CHARACTERS = "abcdefghijklmnopqrstuvwxyz 0123456789"


def training_sentences(n_captions: int) -> Iterator[str]:
    for scene in generate_scenes(n_captions, seed=3_000_003):
        yield scene.caption
    for _ in range(20):  # every character, so that words outside the vocabulary spell out
        yield _CHARACTERS


def build(out: Path, n_captions: int = 2000) -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_sentences(n_captions),
        model_writer=model,
        vocab_size=VOCAB_SIZE,
        model_type="bpe",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        normalization_rule_name="nmt_nfkc_cf",  # NFKC and lower case, as SigLIP's
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "spiece.model"
        vocab_file.write_bytes(model.getvalue())
        tokenizer = SiglipTokenizer(vocab_file=str(vocab_file), model_max_length=32)
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the tokenizer directory to write")
    args = ap.parse_args(argv)
    build(args.out)
    print(f"wrote {sorted(p.name for p in args.out.iterdir())} to {args.out}")


if __name__ == "__main__":
    main()
