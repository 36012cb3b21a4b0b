"""Helpers of the local lm-eval task YAMLs in this folder."""


def drop_blank(dataset):
    """WikiText's blank lines carry no text: a perplexity task over them would score empty strings."""
    return dataset.filter(lambda row: bool(row["text"].strip()))
