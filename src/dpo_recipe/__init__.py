"""dpo-recipe: Direct Preference Optimization on Hugging Face TRL, from YAML config to report."""

__version__ = "0.1.0"
