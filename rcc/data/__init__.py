"""Training data (docs/method.md section 3), one module per concept:

- :mod:`rcc.data.records`: reading records (JSONL, JSON lists, text files, saved
  and hub datasets) with exact error locations; :class:`DataReport`;
- :mod:`rcc.data.tokens`: memory-mapped token files (``rcc prepare-data``):
  :class:`TokenWriter`, :class:`TokenFile`, :func:`prepare_data`;
- :mod:`rcc.data.pretrain`: compression-pretraining micro-batches (:class:`PretrainBatches`);
- :mod:`rcc.data.finetune`: QA records to :class:`FinetuneExample` and their micro-batches
  (:class:`FinetuneBatches`); :func:`save_examples` writes examples tokenized once.

Every micro-batch is a dict ``{"context_ids": [b, c*W], "input_ids": [b, m],
"labels": [b, m]}`` (+ ``"attention_mask": [b, m]`` when rows are padded), the
arguments of :meth:`rcc.RCCModel.forward`. Batch ``i`` depends only on the
seed and ``i``, so the data position of a run is one integer and a resumed run
sees exactly the batches an uninterrupted one would.
"""

from rcc.data.finetune import (FinetuneBatches, FinetuneExample, answer_token, load_examples, qa_fields, qa_texts,
                       save_examples, split_examples)
from rcc.data.pretrain import PretrainBatches
from rcc.data.records import RECORD_SUFFIXES, TEXT_SUFFIXES, BadRecord, DataReport, iter_records
from rcc.data.tokens import (META_NAME, TOKENS_FORMAT, TokenFile, TokenWriter, load_tokenizer, prepare_data, token_dtype,
                     write_token_folder)

__all__ = ["META_NAME", "RECORD_SUFFIXES", "TEXT_SUFFIXES", "TOKENS_FORMAT", "BadRecord", "DataReport",
           "FinetuneBatches", "FinetuneExample", "PretrainBatches", "TokenFile", "TokenWriter", "answer_token",
           "iter_records", "load_examples", "load_tokenizer", "prepare_data", "qa_fields", "qa_texts",
           "save_examples", "split_examples", "token_dtype", "write_token_folder"]
