"""Input pipeline: sources of documents, tokenizing, packing, batching per host (docs/data.md)."""
