"""Data: tokenizers, the bAbI generator, the BABILong builder, text corpora and Grain pipelines."""
