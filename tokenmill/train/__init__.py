"""Training the project's own small default models (corpus, tokenizer, training loop, model card)."""
