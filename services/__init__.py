"""Framework-free core: no module here imports FastAPI."""
