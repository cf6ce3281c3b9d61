"""The facade's services: one object per kind of model work (generation, classification) that
applies every rule of it once (admission, readiness evidence, shared fate, metrics); the routes
only turn HTTP into a call and the result into HTTP (the shape of vLLM's `serving_*.py`)."""
