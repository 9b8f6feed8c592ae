"""Scoring: how persona expression is read from a text.

One seam, `base.Scorer` (labels, identity, provenance, check_personas, score), and one registry,
`registry.SCORERS` (the names a run config's `scorers:` may use). Today one kind is available,
`classifier`; its modules, from the bottom up:

- `registry`: the scorer kinds by name (pure data: the run config validates `scorers:` with it)
- `settings`: `TrainSettings` (the run config's `classifier_training` section), `TrainData`
- `base`: the `Scorer` protocol, `Prediction`, `ScoreInput`, `ScorerContext`, the errors,
  `open_scorer`
- `files`: JSON written atomically and file hashes, for classifier folders
- `sources`: where encoders come from (packaged MiniLM, local folder, hub snapshot); weight hashes
- `tokens`: device, token ids, dynamic padding and progress bars for the torch scorers
- `tiny_classifier`: `tiny:modernbert:...`, a random ModernBERT classifier built from config
- `hf_classifier`: `Classifier`, any HF sequence classifier (labels from its config's id2label)
- `logreg`: logistic-regression heads and the prompt-grouped choice of C
- `lexical`: TF-IDF features (the lexical probe, the baseline's folds)
- `embeddings`: a frozen encoder's sentence embeddings; `ProbeModel`
- `probe_folder`: the probe folder format (plain JSON), saved and loaded
- `heldout`: the held-out split and `train_report.json` (macro-F1 interval, chance, confusion,
  TF-IDF baseline)
- `finetune`, `probe`: the two training recipes
- `classifier`: the `classifier` scorer (load by source, the registry's opener, train by mode)

This package imports nothing at its top, so the run config can read `registry` and `settings`
without loading torch.
"""
