"""The knowledge base: documents, chunks, hybrid retrieval and the jobs that ingest them."""
