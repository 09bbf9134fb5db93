"""Model evaluation through the ordinary engine path: `kvflow eval perplexity`."""
from kvflow.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
