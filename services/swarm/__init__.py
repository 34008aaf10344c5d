"""Several agents on one prompt: the memory policy and the runner that follows it."""
