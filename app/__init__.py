"""The FastAPI application: factory, lifespan, dependencies, errors, response models."""
