"""Evaluation: checkpoint loading, streaming QA (BABILong), scoring, perplexity, multiple choice, plots."""
