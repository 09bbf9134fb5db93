"""Serverless serving on Ray Serve (DeepFlow): scale to zero, a pre-warmed pool, fast cold starts, and the
prefix cache kept across scale-downs. See docs/serverless.md."""
