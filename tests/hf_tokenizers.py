"""Real Hugging Face fast tokenizers built offline with the ``tokenizers`` library (no download):
a byte-level BPE (multi-byte characters split across tokens) and a BERT-style WordPiece whose
``decode`` cleans up spaces (``it ' s`` -> ``it's``)."""

from __future__ import annotations

from typing import Any

CORPUS = [
    "it's fine, don't worry. The cache isn't cold: it 's warm .",
    "héllo wörld ∑ 日本語 ok?",
    "We can't, they won't; you'd say it's 'quoted' text !",
] * 20


def byte_level_bpe() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", clean_up_tokenization_spaces=False)


def wordpiece() -> Any:
    """A BERT-style tokenizer whose ``decode`` cleans spaces up: ``it ' s`` decodes to ``it's``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", clean_up_tokenization_spaces=True)
