"""Supermix's model source of truth: configs, tokenizer, model, corpus, training. No CLI, no web."""
