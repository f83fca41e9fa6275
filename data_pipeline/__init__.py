"""data_pipeline: raw multilingual text → tokenized shards → mixed, packed, masked batches for MLM pretraining.

Modules, in the order data flows through them:

  tokenizer    load a SentencePiece model / HF tokenizer.json, check the special ids; train a SentencePiece model
  prepare      raw text (parquet tree, JSONL, text files, local TFDS) → per-language ArrayRecord shards + stats.json
  mixture      phase spec (languages, tau, budgets, pass cap) + stats.json → sampling weights p_l ∝ n_l^tau
  packing      grain first-fit / best-fit packing into rows with segment ids, positions and language ids
  masking      MLM masking (Bernoulli selection, 80/10/10, fixed-size list of masked positions)
  pipeline     PipelineConfig, make_train_iterator (checkpointable, process-count independent), eval_batches
  demo_corpus  a real multilingual corpus built at run time from the CLDR locale data shipped with babel
  benchmark    one host's batches at 1,834 languages: start-up, open files, p50/p99 batch time, tokens/s, index memory
"""
