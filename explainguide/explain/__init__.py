"""The explainability engine: attention capture, relevance propagation, task normalisations, token spans."""
